// A small FHIR R4 REST client bound to one session (bearer token).

/** A failed FHIR interaction: `status` and the OperationOutcome's text. */
export class FhirError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorText(response) {
  try {
    const outcome = await response.json();
    const texts = (outcome.issue || []).map((i) => i.diagnostics || i.details?.text).filter(Boolean);
    if (texts.length) return texts.join("; ");
  } catch {
    // not JSON
  }
  return `The server answered ${response.status}`;
}

/** A client for `session.fhirBase`; `onUnauthorized` runs when the token stops working. */
export function createClient(session, { onUnauthorized } = {}) {
  const base = session.fhirBase.replace(/\/$/, "");

  async function request(path, { method = "GET", body, headers = {}, raw = false } = {}) {
    const url = /^https?:\/\//.test(path) ? path : `${base}/${path}`;
    const all = {
      Authorization: `Bearer ${session.accessToken}`,
      Accept: raw ? "*/*" : "application/fhir+json",
      ...headers,
    };
    if (body !== undefined) all["Content-Type"] = "application/fhir+json";
    const response = await fetch(url, {
      method,
      headers: all,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
    if (response.status === 401) {
      if (onUnauthorized) onUnauthorized();
      throw new FhirError(401, "Your session has ended. Please sign in again.");
    }
    if (!response.ok) throw new FhirError(response.status, await errorText(response));
    if (raw) return response;
    return response.status === 204 ? null : response.json();
  }

  /** Every resource of a search (following `next` links, at most `pages` pages). */
  async function search(type, params = {}, pages = 5) {
    let bundle = await request(`${type}?${new URLSearchParams(params)}`);
    const out = [];
    for (let page = 0; bundle; page += 1) {
      for (const entry of bundle.entry || []) {
        if (entry.resource && (!entry.search || entry.search.mode !== "include")) {
          out.push(entry.resource);
        }
      }
      const next = (bundle.link || []).find((l) => l.relation === "next");
      bundle = next && page + 1 < pages ? await request(next.url) : null;
    }
    return out;
  }

  return {
    base,
    request,
    search,
    read: (type, id) => request(`${type}/${encodeURIComponent(id)}`),
    /** PUT a changed resource, guarded by its version (If-Match). */
    update: (resource) =>
      request(`${resource.resourceType}/${encodeURIComponent(resource.id)}`, {
        method: "PUT",
        body: resource,
        headers: resource.meta?.versionId ? { "If-Match": `W/"${resource.meta.versionId}"` } : {},
      }),
    /** Every version of one resource, newest first. */
    history: async (type, id) => {
      const bundle = await request(`${type}/${encodeURIComponent(id)}/_history?_count=100`);
      return (bundle.entry || []).map((e) => e.resource).filter(Boolean);
    },
    ledgerProof: (type, id, vid) =>
      request(`${type}/${encodeURIComponent(id)}/_history/${encodeURIComponent(vid)}/$ledger-proof`, {
        headers: { Accept: "application/json" },
      }),
    ledgerCheckpoint: () => request("$ledger-checkpoint", { headers: { Accept: "application/json" } }),
    /** The raw content behind an Attachment.url (e.g. "Binary/123"), as a Blob. */
    attachment: async (url) => (await request(url, { raw: true })).blob(),
  };
}
