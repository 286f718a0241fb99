-- spin-bulk schema: Aidbox's storage layout, one table per FHIR resource type.
--
-- Each table is named after its resource type in lower case (Patient -> patient,
-- AllergyIntolerance -> allergyintolerance) and holds the current version of each resource:
--   id            the resource id (text, the primary key; $dump pages by it)
--   txid          transaction id, from transaction_id_seq
--   cts / ts      created / last-updated time (ts drives _since)
--   resource_type the FHIR type name
--   status        'created' | 'updated' | 'recreated' | 'deleted'
--   resource      the resource body WITHOUT id, resourceType and meta (Aidbox keeps those in columns)
--
-- Idempotent: every statement uses IF NOT EXISTS, so applying the file twice is harmless.
-- Apply with: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f schema/schema.sql

SET client_min_messages = warning;

CREATE SEQUENCE IF NOT EXISTS transaction_id_seq;

CREATE TABLE IF NOT EXISTS accesspolicy (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'AccessPolicy',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS allergyintolerance (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'AllergyIntolerance',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS careplan (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'CarePlan',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS careteam (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'CareTeam',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS claim (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'Claim',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS client (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'Client',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS condition (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'Condition',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS device (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'Device',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS diagnosticreport (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'DiagnosticReport',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS encounter (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'Encounter',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS explanationofbenefit (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'ExplanationOfBenefit',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS imagingstudy (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'ImagingStudy',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS immunization (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'Immunization',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS medicationrequest (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'MedicationRequest',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS observation (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'Observation',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS organization (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'Organization',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS patient (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'Patient',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS practitioner (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'Practitioner',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

CREATE TABLE IF NOT EXISTS procedure (
  id            text        PRIMARY KEY,
  txid          bigint      NOT NULL,
  cts           timestamptz NOT NULL DEFAULT now(),
  ts            timestamptz NOT NULL DEFAULT now(),
  resource_type text        NOT NULL DEFAULT 'Procedure',
  status        text        NOT NULL,
  resource      jsonb       NOT NULL
);

-- Bulk Data $export jobs (src/export.rs). Nothing is precomputed: a row only records the
-- kick-off (who, what, when); the manifest and the files are computed on request. The
-- component also creates this table on demand (same statement), so older databases work.
--   id               the job id in the status URL (random uuid)
--   client_id        the Client that kicked it off (only it, or admin, may read it)
--   kind             'system' | 'patient'
--   request          the kick-off URL (the manifest's `request`)
--   params           _type, _since, _outputFormat and the parameters ignored as lenient
--   transaction_time the database clock at kick-off (the manifest's transactionTime)
-- Jobs expire 24 hours after kick-off; kick-off purges expired rows.
CREATE TABLE IF NOT EXISTS bulk_export (
  id               text        PRIMARY KEY DEFAULT gen_random_uuid()::text,
  client_id        text        NOT NULL,
  kind             text        NOT NULL,
  request          text        NOT NULL,
  params           jsonb       NOT NULL,
  transaction_time timestamptz NOT NULL DEFAULT now()
);
