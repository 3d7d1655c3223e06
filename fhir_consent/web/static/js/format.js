// Plain-language text for FHIR codes, references, dates and durations.

const RESOURCE_NAMES = {
  DocumentReference: "Documents",
  Observation: "Test results",
  Condition: "Conditions",
  MedicationRequest: "Prescriptions",
  MedicationStatement: "Medications",
  AllergyIntolerance: "Allergies",
  Immunization: "Immunizations",
  Encounter: "Visits",
  Procedure: "Procedures",
  DiagnosticReport: "Reports",
  Patient: "Your details",
  Binary: "Document content",
  Consent: "Consents",
};

const PURPOSES = {
  TREAT: "Treatment",
  ETREAT: "Emergency treatment",
  CAREMGT: "Care management",
  HPAYMT: "Payment",
  HOPERAT: "Healthcare operations",
  HRESCH: "Research",
  PATRQT: "Your own request",
  PUBHLTH: "Public health",
  FAMRQT: "Family request",
};

const ACTIONS = {
  read: "opened",
  vread: "opened a version of",
  "history-instance": "viewed the history of",
  "history-type": "viewed the history of",
  "search-type": "searched",
  operation: "retrieved",
  create: "added",
  update: "changed",
  patch: "changed",
  delete: "deleted",
};

/** Friendly name of a resource type ("DocumentReference" → "Documents"). */
export function resourceName(type) {
  return RESOURCE_NAMES[type] || type;
}

/** The verb of an AuditEvent's RESTful interaction. */
export function actionVerb(code) {
  return ACTIONS[code] || code || "accessed";
}

/** Text of a Coding: display, else a known purpose, else the code. */
export function codingText(coding) {
  if (!coding) return "";
  return coding.display || PURPOSES[coding.code] || coding.code || "";
}

/** Text of a CodeableConcept. */
export function conceptText(concept) {
  if (!concept) return "";
  if (concept.text) return concept.text;
  const coding = (concept.coding || [])[0];
  return codingText(coding);
}

/** Purpose-of-use text (v3 ActReason codes). */
export function purposeText(coding) {
  return (coding && PURPOSES[coding.code]) || codingText(coding);
}

/** "23 Nov 2026" for a FHIR date or dateTime. */
export function formatDate(value) {
  if (!value) return "";
  const d = parseFhirDate(value);
  if (Number.isNaN(d.getTime())) return value;
  return d.toLocaleDateString("en-GB", { day: "numeric", month: "short", year: "numeric" });
}

/** "23 Nov 2026, 20:11" for an instant. */
export function formatDateTime(value) {
  if (!value) return "";
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return value;
  return d.toLocaleString("en-GB", {
    day: "numeric",
    month: "short",
    year: "numeric",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
}

/** A FHIR date/dateTime as a Date (a bare date is midnight UTC of that day). */
export function parseFhirDate(value) {
  if (/^\d{4}$/.test(value)) return new Date(`${value}-01-01T00:00:00Z`);
  if (/^\d{4}-\d{2}$/.test(value)) return new Date(`${value}-01T00:00:00Z`);
  if (/^\d{4}-\d{2}-\d{2}$/.test(value)) return new Date(`${value}T00:00:00Z`);
  return new Date(value);
}

/** The end of a period as a Date: a bare date ends at the end of that day. */
export function periodEnd(period) {
  if (!period || !period.end) return null;
  const end = parseFhirDate(period.end);
  if (/^\d{4}-\d{2}-\d{2}$/.test(period.end)) end.setUTCHours(23, 59, 59, 999);
  return end;
}

/** "for 90 days", from a period. */
export function periodLength(period) {
  if (!period || !period.end) return "with no end date";
  const start = period.start ? parseFhirDate(period.start) : new Date();
  const days = Math.round((parseFhirDate(period.end) - start) / 86400000);
  if (days <= 0) return "for less than a day";
  if (days === 1) return "for 1 day";
  return `for ${days} days`;
}

/** "29 days left", "5 hours left", "expired", "no end date". */
export function timeLeft(period, now = Date.now()) {
  const end = periodEnd(period);
  if (!end) return "no end date";
  const ms = end - now;
  if (ms <= 0) return "expired";
  const hours = ms / 3600000;
  if (hours < 1) return `${Math.max(1, Math.round(ms / 60000))} minutes left`;
  if (hours < 48) return `${Math.round(hours)} hours left`;
  return `${Math.floor(hours / 24)} days left`;
}

/** "yyyy-mm-dd" of a Date (UTC), for date inputs. */
export function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

/** "12 KB" for a byte count. */
export function formatSize(bytes) {
  if (bytes === undefined || bytes === null) return "";
  if (bytes < 1024) return `${bytes} bytes`;
  if (bytes < 1024 * 1024) return `${Math.round(bytes / 1024)} KB`;
  return `${(bytes / 1048576).toFixed(1)} MB`;
}

/** Short text for a content type. */
export function contentTypeText(type) {
  const map = {
    "application/pdf": "PDF",
    "application/hl7-cda+xml": "CDA document",
    "text/plain": "Text",
    "image/png": "PNG image",
    "image/jpeg": "JPEG image",
  };
  return map[type] || type || "";
}
