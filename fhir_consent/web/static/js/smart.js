// SMART App Launch 2.2, standalone launch, as a public client with PKCE (S256).
// Discovery: {fhirBase}/.well-known/smart-configuration. The token lives in sessionStorage
// for this tab only; it is sent in the Authorization header and nowhere else.

const SESSION = "fhir-consent.session";
const PENDING = "fhir-consent.pending";

/** The app's launch settings from the server that serves it (client id, FHIR base, scope). */
export async function loadConfig() {
  const response = await fetch("config.json", { cache: "no-store" });
  if (!response.ok) throw new Error("The app's configuration could not be loaded.");
  return response.json();
}

/** The SMART configuration of the FHIR server. */
export async function discover(fhirBase) {
  const response = await fetch(`${fhirBase}/.well-known/smart-configuration`, {
    headers: { Accept: "application/json" },
  });
  if (!response.ok) throw new Error("The server's SMART configuration could not be loaded.");
  return response.json();
}

function base64url(bytes) {
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomString(size) {
  return base64url(crypto.getRandomValues(new Uint8Array(size)));
}

/** This app's redirect URI: the page's own address without query or fragment. */
export function redirectUri() {
  const url = new URL("./", window.location.href);
  return url.origin + url.pathname;
}

/** Start the authorization code flow (RFC 6749 §4.1, RFC 7636 S256): leaves the page. */
export async function signIn(config, smart) {
  const verifier = randomString(48);
  const state = randomString(16);
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  const pending = {
    verifier,
    state,
    redirectUri: redirectUri(),
    tokenEndpoint: smart.token_endpoint,
    fhirBase: config.fhirBase,
    view: window.location.hash,
  };
  sessionStorage.setItem(PENDING, JSON.stringify(pending));
  const url = new URL(smart.authorization_endpoint);
  url.search = new URLSearchParams({
    response_type: "code",
    client_id: config.clientId,
    redirect_uri: pending.redirectUri,
    scope: config.scope,
    state,
    aud: config.fhirBase,
    code_challenge: base64url(new Uint8Array(digest)),
    code_challenge_method: "S256",
  }).toString();
  window.location.assign(url.toString());
}

function claimsOf(jwt) {
  try {
    const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(part), (c) => c.charCodeAt(0))));
  } catch {
    return {};
  }
}

/**
 * Finish the flow when the page is the redirect target (?code=…&state=…): check `state`,
 * exchange the code with the PKCE verifier, and keep the session. Returns null otherwise.
 */
export async function completeSignIn(config) {
  const params = new URLSearchParams(window.location.search);
  if (!params.has("code") && !params.has("error")) return null;
  const pending = JSON.parse(sessionStorage.getItem(PENDING) || "null");
  sessionStorage.removeItem(PENDING);
  window.history.replaceState(null, "", window.location.pathname + (pending?.view || ""));
  if (params.has("error")) {
    throw new Error(params.get("error_description") || `Sign-in failed: ${params.get("error")}`);
  }
  if (!pending || params.get("state") !== pending.state) {
    throw new Error("This sign-in answer does not belong to this browser tab. Please sign in again.");
  }
  const response = await fetch(pending.tokenEndpoint, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded", Accept: "application/json" },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      code: params.get("code"),
      redirect_uri: pending.redirectUri,
      code_verifier: pending.verifier,
      client_id: config.clientId,
    }),
  });
  const token = await response.json().catch(() => ({}));
  if (!response.ok || !token.access_token) {
    throw new Error(token.error_description || token.error || "The sign-in could not be completed.");
  }
  if (!token.patient) throw new Error("This sign-in did not select a patient record.");
  const claims = token.id_token ? claimsOf(token.id_token) : {};
  const session = {
    accessToken: token.access_token,
    patient: token.patient,
    fhirUser: claims.fhirUser || null,
    scope: token.scope || "",
    expiresAt: Date.now() + (Number(token.expires_in) || 3600) * 1000,
    fhirBase: pending.fhirBase || config.fhirBase,
  };
  sessionStorage.setItem(SESSION, JSON.stringify(session));
  return session;
}

/** The stored session, or null when there is none or it has expired. */
export function currentSession() {
  const session = JSON.parse(sessionStorage.getItem(SESSION) || "null");
  if (!session || session.expiresAt <= Date.now()) return null;
  return session;
}

/** Forget the session (the token simply expires on the server). */
export function signOut() {
  sessionStorage.removeItem(SESSION);
}
