// payctl's load script: the payment API under a constant arrival rate (payctl verify runs it; see docs/verify.md).
//
// Everything comes from the environment, so one script serves every phase:
//   BASE_URL      http://10.77.0.11 (required)          SCENARIO   authorize | full-flow | mixed (default authorize)
//   RATE          iterations per second (required)      DURATION   measured time, k6 syntax (default 30s)
//   WARMUP        time before the measurement (0s = none; its samples are tagged scenario=warmup, never judged)
//   MERCHANTS     merchants the load is spread over (default 100)   MERCHANT_PREFIX   (default k6m)
//   MIX           JSON weights for mixed, e.g. {"authorize":0.5,"capture":0.25,"refund":0.1,"void":0.05,"get":0.1}
//   REFUND_RATIO  fraction of full flows that also refund (default 0.3)
//   PRE_VUS, MAX_VUS   VU pool of the arrival-rate executor (defaults scale with RATE)
//   P95_MS, P99_MS, MAX_ERROR_RATE   thresholds, so k6 itself exits 99 when the measured window misses them
//   RUN_ID        makes idempotency keys unique across runs (payctl passes a random one)
//   SUMMARY_PATH  where handleSummary writes the end-of-test JSON (payctl reads it)
//
// One iteration of `authorize` and of `mixed` is exactly one request, so RATE is requests per second there; one
// iteration of `full-flow` is a whole payment (authorize, its idempotent replay, capture, sometimes a refund).
// Status checks carry the tag kind=status (failed requests are judged by the error rate); checks on what a correct
// response says carry kind=functional (they must all pass).

import http from "k6/http";
import { check } from "k6";
import exec from "k6/execution";

const BASE_URL = (__ENV.BASE_URL || "").replace(/\/+$/, "");
const SCENARIO = __ENV.SCENARIO || "authorize";
const RATE = parseInt(__ENV.RATE || "0", 10);
const DURATION = __ENV.DURATION || "30s";
const WARMUP = __ENV.WARMUP || "0s";
const MERCHANTS = parseInt(__ENV.MERCHANTS || "100", 10);
const MERCHANT_PREFIX = __ENV.MERCHANT_PREFIX || "k6m";
const REFUND_RATIO = parseFloat(__ENV.REFUND_RATIO || "0.3");
const RUN_ID = __ENV.RUN_ID || `${Date.now().toString(36)}`;
const MIX = JSON.parse(__ENV.MIX || '{"authorize":0.5,"capture":0.25,"refund":0.1,"void":0.05,"get":0.1}');
const PRE_VUS = parseInt(__ENV.PRE_VUS || `${Math.max(10, Math.ceil(RATE / 10))}`, 10);
const MAX_VUS = parseInt(__ENV.MAX_VUS || `${Math.max(20, RATE)}`, 10);

if (!BASE_URL) throw new Error("BASE_URL is required");
if (!(RATE > 0)) throw new Error("RATE must be a positive integer");
if (!["authorize", "full-flow", "mixed"].includes(SCENARIO)) throw new Error(`unknown SCENARIO ${SCENARIO}`);

function isZero(duration) {
  return /^0+(\.0+)?(ms|s|m|h)?$/.test(duration);
}

function arrival(extra) {
  return Object.assign(
    {
      executor: "constant-arrival-rate",
      exec: "run",
      rate: RATE,
      timeUnit: "1s",
      preAllocatedVUs: Math.min(PRE_VUS, MAX_VUS),
      maxVUs: MAX_VUS,
    },
    extra,
  );
}

const scenarios = {};
if (!isZero(WARMUP)) {
  scenarios.warmup = arrival({ duration: WARMUP, gracefulStop: "5s" });
}
scenarios.measure = arrival({ duration: DURATION, startTime: isZero(WARMUP) ? "0s" : WARMUP, gracefulStop: "10s" });

const thresholds = {
  // Sub-metrics of the measured window only; payctl reads them from the summary (they exist because they are here).
  "http_req_duration{scenario:measure}": [],
  "http_req_failed{scenario:measure}": [],
  "http_reqs{scenario:measure}": [],
  "iterations{scenario:measure}": [],
  "dropped_iterations{scenario:measure}": [],
  "checks{scenario:measure,kind:functional}": ["rate==1"],
  "checks{scenario:measure,kind:status}": [],
};
if (__ENV.P95_MS) thresholds["http_req_duration{scenario:measure}"].push(`p(95)<=${parseFloat(__ENV.P95_MS)}`);
if (__ENV.P99_MS) thresholds["http_req_duration{scenario:measure}"].push(`p(99)<=${parseFloat(__ENV.P99_MS)}`);
if (__ENV.MAX_ERROR_RATE) thresholds["http_req_failed{scenario:measure}"].push(`rate<=${parseFloat(__ENV.MAX_ERROR_RATE)}`);

export const options = {
  scenarios,
  thresholds,
  summaryTrendStats: ["avg", "min", "med", "max", "p(50)", "p(90)", "p(95)", "p(99)", "count"],
  discardResponseBodies: false,
  noConnectionReuse: false,
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

function body(res) {
  try {
    return res.json();
  } catch (_e) {
    return null;
  }
}

function post(path, payload, name, headers) {
  return http.post(`${BASE_URL}${path}`, JSON.stringify(payload), {
    headers: Object.assign({}, JSON_HEADERS, headers || {}),
    tags: { name },
  });
}

function ok(res, what) {
  return check(res, { [`${what} 200`]: (r) => r.status === 200 }, { kind: "status" });
}

function authorize() {
  const payload = {
    merchantId: merchant(),
    amount: 1000 + Math.floor(Math.random() * 99000),
    currency: "KRW",
    idempotencyKey: key(),
  };
  const res = post("/payments/authorize", payload, "authorize");
  if (!ok(res, "authorize")) return null;
  const b = body(res);
  check(
    b,
    {
      "authorize returns a payment id": (x) => x !== null && Number.isInteger(x.paymentId) && x.paymentId > 0,
      "authorize status REQUESTED": (x) => x !== null && x.status === "REQUESTED",
      "authorize echoes the amount": (x) => x !== null && x.amount === payload.amount,
    },
    { kind: "functional" },
  );
  if (b === null || !b.paymentId) return null;
  return { id: b.paymentId, merchantId: payload.merchantId, amount: payload.amount, payload };
}

function replay(p) {
  const res = post("/payments/authorize", p.payload, "authorize-replay");
  if (!ok(res, "replay")) return;
  const b = body(res);
  check(
    res,
    {
      "replay returns the same payment": () => b !== null && b.paymentId === p.id,
      "replay is marked replayed": (r) => String(r.headers["Idempotent-Replayed"] || "").toLowerCase() === "true",
    },
    { kind: "functional" },
  );
}

function capture(p) {
  const res = post(`/payments/capture/${p.id}`, { merchantId: p.merchantId }, "capture", { "Idempotency-Key": key() });
  if (!ok(res, "capture")) return false;
  const b = body(res);
  check(b, { "capture status COMPLETED": (x) => x !== null && x.status === "COMPLETED" }, { kind: "functional" });
  return true;
}

function refund(p) {
  const res = post(`/payments/refund/${p.id}`, { merchantId: p.merchantId, reason: "k6" }, "refund", {
    "Idempotency-Key": key(),
  });
  if (!ok(res, "refund")) return;
  const b = body(res);
  check(b, { "refund status REFUNDED": (x) => x !== null && x.status === "REFUNDED" }, { kind: "functional" });
}

function voidPayment(p) {
  const res = post(`/payments/void/${p.id}`, { merchantId: p.merchantId }, "void", { "Idempotency-Key": key() });
  if (!ok(res, "void")) return;
  const b = body(res);
  check(b, { "void status CANCELLED": (x) => x !== null && x.status === "CANCELLED" }, { kind: "functional" });
}

function get(p) {
  const res = http.get(`${BASE_URL}/payments/${p.id}?merchantId=${encodeURIComponent(p.merchantId)}`, {
    tags: { name: "get" },
  });
  if (!ok(res, "get")) return;
  const b = body(res);
  check(b, { "get returns the payment": (x) => x !== null && x.paymentId === p.id }, { kind: "functional" });
}

function fullFlow() {
  const p = authorize();
  if (p === null) return;
  replay(p);
  if (!capture(p)) return;
  if (Math.random() < REFUND_RATIO) refund(p);
}

// Per-VU pools for `mixed`: payments this VU authorized (capturable or voidable) and captured (refundable).
const POOL_MAX = 1000;
const authorized = [];
const captured = [];
const ACTIONS = Object.keys(MIX).filter((a) => MIX[a] > 0);
const TOTAL_WEIGHT = ACTIONS.reduce((s, a) => s + MIX[a], 0);

function pick() {
  let r = Math.random() * TOTAL_WEIGHT;
  for (const a of ACTIONS) {
    r -= MIX[a];
    if (r < 0) return a;
  }
  return ACTIONS[ACTIONS.length - 1];
}

function remember(pool, p) {
  pool.push(p);
  if (pool.length > POOL_MAX) pool.shift();
}

// One request per iteration: an action whose pool is empty authorizes instead (and fills the pool).
function mixed() {
  const action = pick();
  if (action === "capture" && authorized.length > 0) {
    const p = authorized.shift();
    if (capture(p)) remember(captured, p);
  } else if (action === "void" && authorized.length > 0) {
    voidPayment(authorized.shift());
  } else if (action === "refund" && captured.length > 0) {
    refund(captured.shift());
  } else if (action === "get" && (captured.length > 0 || authorized.length > 0)) {
    const pool = captured.length > 0 ? captured : authorized;
    get(pool[Math.floor(Math.random() * pool.length)]);
  } else {
    const p = authorize();
    if (p !== null) remember(authorized, p);
  }
}

export function run() {
  if (SCENARIO === "authorize") authorize();
  else if (SCENARIO === "full-flow") fullFlow();
  else mixed();
}

export function handleSummary(data) {
  const out = {};
  if (__ENV.SUMMARY_PATH) out[__ENV.SUMMARY_PATH] = JSON.stringify(data);
  return out;
}
