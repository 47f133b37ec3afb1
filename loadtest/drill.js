// payctl's fault-drill load (payctl drill runs it; see docs/reliability.md): payments at a constant arrival rate,
// every request and every acknowledged operation written to k6's log, so the audit afterwards can check that each
// payment the client saw acknowledged (200) is in the database, settled once, and its events applied once.
//
// Environment:
//   BASE_URL         http://10.77.0.11 (required)      RATE       payment flows per second (required)
//   DURATION         whole run, k6 syntax (default 30s)
//   MERCHANT_PREFIX  merchants of this run are PREFIX1..PREFIX<MERCHANTS> (the audit selects them by prefix)
//   MERCHANTS        default 20          RUN_ID     makes idempotency keys unique (payctl passes a random one)
//   CAPTURE_RATIO    fraction of acknowledged authorizations then captured (default 0.6)
//   REFUND_RATIO     fraction of acknowledged captures then refunded (default 0.2)
//   TIMEOUT          per-request timeout (default 5s: a partitioned host must not hold a VU for a minute)
//   PRE_VUS, MAX_VUS VU pool of the arrival-rate executor
//
// Log lines (run k6 with --log-format=raw --log-output=file=PATH); anything else in the log is k6's own:
//   Q <epoch ms> <name> <status>               one per request (status 0: no response: refused, reset, timed out)
//   A <payment id> <merchant> <amount> <key>   an authorization acknowledged with 200
//   C <payment id> <amount>                    a capture acknowledged with 200
//   R <payment id> <amount>                    a refund acknowledged with 200
// A request that got no response or a 5xx is retried once with the same idempotency key, as a careful client
// would: the service must neither lose nor duplicate it.

import http from "k6/http";
import { sleep } from "k6";
import exec from "k6/execution";

const BASE_URL = (__ENV.BASE_URL || "").replace(/\/+$/, "");
const RATE = parseInt(__ENV.RATE || "0", 10);
const DURATION = __ENV.DURATION || "30s";
const MERCHANTS = parseInt(__ENV.MERCHANTS || "20", 10);
const MERCHANT_PREFIX = __ENV.MERCHANT_PREFIX || "drill";
const RUN_ID = __ENV.RUN_ID || `${Date.now().toString(36)}`;
const CAPTURE_RATIO = parseFloat(__ENV.CAPTURE_RATIO || "0.6");
const REFUND_RATIO = parseFloat(__ENV.REFUND_RATIO || "0.2");
const TIMEOUT = __ENV.TIMEOUT || "5s";
const PRE_VUS = parseInt(__ENV.PRE_VUS || `${Math.max(10, RATE * 2)}`, 10);
const MAX_VUS = parseInt(__ENV.MAX_VUS || `${Math.max(50, RATE * 8)}`, 10);

if (!BASE_URL) throw new Error("BASE_URL is required");
if (!(RATE > 0)) throw new Error("RATE must be a positive integer");

export const options = {
  scenarios: {
    drill: {
      executor: "constant-arrival-rate",
      exec: "run",
      rate: RATE,
      timeUnit: "1s",
      duration: DURATION,
      preAllocatedVUs: Math.min(PRE_VUS, MAX_VUS),
      maxVUs: MAX_VUS,
      gracefulStop: "10s",
    },
  },
  discardResponseBodies: false,
  summaryTrendStats: ["avg", "p(95)", "max", "count"],
};

const JSON_HEADERS = { "Content-Type": "application/json" };
let seq = 0;

function key() {
  seq += 1;
  return `${RUN_ID}-${exec.vu.idInTest}-${seq}`;
}

function merchant() {
  return `${MERCHANT_PREFIX}${1 + Math.floor(Math.random() * MERCHANTS)}`;
}

function post(path, payload, name, headers) {
  const res = http.post(`${BASE_URL}${path}`, JSON.stringify(payload), {
    headers: Object.assign({}, JSON_HEADERS, headers || {}),
    tags: { name },
    timeout: TIMEOUT,
  });
  console.log(`Q ${Date.now()} ${name} ${res.status}`);
  return res;
}

// One retry with the same body and idempotency key when the outcome is unknown (no response, or a 5xx).
function postOnce(path, payload, name, headers) {
  let res = post(path, payload, name, headers);
  if (res.status === 0 || res.status >= 500) {
    sleep(0.2);
    res = post(path, payload, `${name}-retry`, headers);
  }
  return res;
}

function body(res) {
  try {
    return res.json();
  } catch (_e) {
    return null;
  }
}

export function run() {
  const k = key();
  const m = merchant();
  const amount = 1000 + Math.floor(Math.random() * 99000);
  const auth = postOnce("/payments/authorize", { merchantId: m, amount, currency: "KRW", idempotencyKey: k }, "authorize");
  const b = auth.status === 200 ? body(auth) : null;
  if (b === null || !Number.isInteger(b.paymentId)) return;
  console.log(`A ${b.paymentId} ${m} ${amount} ${k}`);
  if (Math.random() >= CAPTURE_RATIO) return;
  const cap = postOnce(`/payments/capture/${b.paymentId}`, { merchantId: m }, "capture", { "Idempotency-Key": `${k}-c` });
  if (cap.status !== 200) return;
  console.log(`C ${b.paymentId} ${amount}`);
  if (Math.random() >= REFUND_RATIO) return;
  const ref = postOnce(`/payments/refund/${b.paymentId}`, { merchantId: m, reason: "drill" }, "refund", {
    "Idempotency-Key": `${k}-r`,
  });
  if (ref.status === 200) console.log(`R ${b.paymentId} ${amount}`);
}

export function handleSummary(_data) {
  return {}; // the log is the record; nothing on stdout
}
