// k6 script of bench/bench_authorize.py: one constant-arrival-rate step of POST /payments/authorize.
// Load is spread over MERCHANTS merchants (as production traffic is), so the per-merchant rate limit is never
// what gets measured; every request has its own idempotency key, so each one is a new payment.
//
//   k6 run -e TARGET=http://127.0.0.1:8080 -e RATE=2000 -e DURATION=8s -e MERCHANTS=1000 bench_authorize.js
// Optional: -e REUSE=0 opens a new connection per request (keep-alive off), -e RUN=<tag> for unique keys.
import http from 'k6/http';

const rate = Number(__ENV.RATE || 1000);
const merchants = Number(__ENV.MERCHANTS || 1000);
const run = __ENV.RUN || `${Date.now()}`;
const url = `${__ENV.TARGET || 'http://127.0.0.1:8080'}/payments/authorize`;

export const options = {
    discardResponseBodies: true,
    noConnectionReuse: __ENV.REUSE === '0',
    summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
    scenarios: {
        step: {
            executor: 'constant-arrival-rate',
            rate: rate,
            timeUnit: '1s',
            duration: __ENV.DURATION || '8s',
            preAllocatedVUs: Math.max(50, Math.ceil(rate / 20)),
            maxVUs: Math.max(200, Math.ceil(rate / 4)),
            gracefulStop: '2s',
        },
    },
};

const params = { headers: { 'Content-Type': 'application/json' }, timeout: '5s' };

export default function () {
    const n = __ITER * 1000 + __VU;
    const body = JSON.stringify({
        merchantId: `bench-${n % merchants}`,
        amount: 1000 + (n % 9000),
        currency: 'KRW',
        idempotencyKey: `${run}-${__VU}-${__ITER}`,
    });
    http.post(url, body, params);
}
