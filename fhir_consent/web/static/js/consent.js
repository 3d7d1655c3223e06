// Reading and changing Consents the way consent.md §2 describes: the patient grants
// (status active, optionally narrowed), refuses (rejected) or revokes (inactive).

import { conceptText, codingText, resourceName, purposeText } from "./format.js";

const RECIPIENT_ROLES = new Set(["PRCP", "IRCP", "DELEGATEE", "AUTHZR"]);

/** The references of the provision's recipients (who would get access). */
export function recipients(consent) {
  const actors = consent.provision?.actor || [];
  const chosen = actors.filter((a) => {
    const code = a.role?.coding?.[0]?.code;
    return !code || RECIPIENT_ROLES.has(code);
  });
  return (chosen.length ? chosen : actors).map((a) => a.reference).filter(Boolean);
}

/** Who the Consent is about, in words (recipients' names, else who recorded it). */
export function whoText(consent, names) {
  const refs = recipients(consent);
  const list = refs.length ? refs : [...(consent.organization || []), ...(consent.performer || [])];
  const labels = list.map((r) => names.label(r.reference, r.display));
  return [...new Set(labels)].join(", ") || "Someone";
}

/** What the provision covers: resource types and document types, as text items. */
export function scopeItems(consent) {
  const provision = consent.provision || {};
  const items = [];
  for (const c of provision.class || []) {
    items.push({ kind: "class", key: `${c.system}|${c.code}`, text: resourceName(c.code) || codingText(c) });
  }
  for (const c of provision.code || []) {
    const coding = c.coding?.[0] || {};
    items.push({ kind: "code", key: `${coding.system}|${coding.code}`, text: conceptText(c) });
  }
  return items;
}

export function scopeText(consent) {
  const items = scopeItems(consent);
  if (!items.length) return "All your records";
  const classes = items.filter((i) => i.kind === "class").map((i) => i.text);
  const codes = items.filter((i) => i.kind === "code").map((i) => i.text);
  if (classes.length && codes.length) return `${classes.join(", ")}: ${codes.join(", ")}`;
  return [...classes, ...codes].join(", ");
}

/** The requesting organization's name (else every recipient), for headings. */
export function requesterText(consent, names) {
  const org = recipients(consent).find((r) => (r.reference || "").startsWith("Organization/"));
  return org ? names.label(org.reference, org.display) : whoText(consent, names);
}

export function purposeList(consent) {
  return (consent.provision?.purpose || []).map(purposeText).join(", ") || "Not stated";
}

export function isDeny(consent) {
  return consent.provision?.type === "deny";
}

export const STATUS_TEXT = {
  proposed: "Waiting for your answer",
  active: "Granted",
  rejected: "Refused",
  inactive: "Revoked",
  "entered-in-error": "Withdrawn",
  draft: "Draft",
};

/**
 * A granted copy of `consent`: status active, the period ending no later than `until`
 * ("yyyy-mm-dd", optional), and only the class/code items whose keys are in `keep`.
 */
export function granted(consent, { until, keep } = {}) {
  const copy = structuredClone(consent);
  copy.status = "active";
  const provision = (copy.provision = copy.provision || {});
  if (until) {
    provision.period = { ...(provision.period || {}), end: until };
  }
  if (keep) {
    if (provision.class) {
      provision.class = provision.class.filter((c) => keep.has(`${c.system}|${c.code}`));
      // an empty list would mean "everything": never widen a grant by narrowing it
      if (!provision.class.length) throw new Error("Keep at least one kind of record, or refuse.");
    }
    if (provision.code) {
      provision.code = provision.code.filter((c) => {
        const coding = c.coding?.[0] || {};
        return keep.has(`${coding.system}|${coding.code}`);
      });
      if (!provision.code.length) throw new Error("Keep at least one document type, or refuse.");
    }
  }
  return copy;
}

/** `consent` with a new status (refuse: rejected; revoke: inactive). */
export function withStatus(consent, status) {
  return { ...structuredClone(consent), status };
}
