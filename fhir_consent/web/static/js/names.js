// Names for references ("Organization/1" → "Clinic A"), fetched once each with the
// patient's own token and cached for the session.

function humanName(names) {
  const name = (names || [])[0];
  if (!name) return "";
  if (name.text) return name.text;
  return [...(name.prefix || []), ...(name.given || []), name.family].filter(Boolean).join(" ");
}

/** Display text of a resource that is a person, organization or device. */
export function displayOf(resource) {
  switch (resource.resourceType) {
    case "Organization":
      return resource.name || "";
    case "Practitioner":
    case "Patient":
    case "RelatedPerson":
    case "Person":
      return humanName(resource.name);
    case "PractitionerRole":
      return resource.practitioner?.display || resource.organization?.display || "";
    case "Device":
      return resource.deviceName?.[0]?.name || "";
    default:
      return "";
  }
}

const NAMED = new Set([
  "Organization", "Practitioner", "PractitionerRole", "Patient", "RelatedPerson", "Person", "Device",
]);

/** A name cache bound to a client; `self` is the signed-in patient's reference. */
export function createNames(client, self) {
  const names = new Map();
  const pending = new Map();

  function key(ref) {
    return typeof ref === "string" ? ref.replace(/^.*\/(\w+\/[^/]+)$/, "$1").split("/_history")[0] : "";
  }

  return {
    /** Fetch the names of these references (unknown ones only); never rejects. */
    async load(refs) {
      const jobs = [];
      for (const ref of refs) {
        const k = key(ref);
        const [type, id] = k.split("/");
        if (!id || !NAMED.has(type) || names.has(k) || k === self) continue;
        if (!pending.has(k)) {
          pending.set(
            k,
            client
              .read(type, id)
              .then((resource) => names.set(k, displayOf(resource) || k))
              .catch(() => names.set(k, null)),
          );
        }
        jobs.push(pending.get(k));
      }
      await Promise.all(jobs);
    },
    /** The name of a reference, else its `display`, else the reference itself. */
    label(ref, display) {
      const k = key(ref);
      if (k && k === self) return "You";
      return names.get(k) || display || k || "Someone";
    },
    isSelf(ref) {
      return key(ref) === self;
    },
  };
}

/** Every person/organization reference a Consent, AuditEvent or DocumentReference names. */
export function referencesIn(resource) {
  const refs = [];
  const add = (r) => r?.reference && refs.push(r.reference);
  if (resource.resourceType === "Consent") {
    for (const a of resource.provision?.actor || []) add(a.reference);
    (resource.performer || []).forEach(add);
    (resource.organization || []).forEach(add);
  } else if (resource.resourceType === "AuditEvent") {
    for (const a of resource.agent || []) add(a.who);
  } else if (resource.resourceType === "DocumentReference") {
    (resource.author || []).forEach(add);
    add(resource.custodian);
  }
  return refs;
}
