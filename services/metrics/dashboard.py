"""The metrics service's dashboard: one static page whose script polls ``/summary``.

The page is the same for every request (only the poll interval is filled in), so the server
does no rendering; the browser fetches ``/summary`` every ``refresh_s`` and rebuilds the tables
with DOM calls (``textContent``: names that came from peers are never parsed as HTML). No
external script, style sheet or font: it works offline and behind a strict firewall.

Per mode (one column each): live throughput (requests received in the summary's
``live_window_s``), SLO attainment and goodput ("n/a — no SLO" when no request carried one:
unknown is not 0), TTFT/TPOT/E2E p50/p90/p99, the sizes of the verifier batches its rounds ran
in, acceptance length (accepted draft tokens per round); then refusals by mode and code,
verification batches, scheduling per batch policy, admission, errors and event counts. Every
value cell carries ``data-mode``/``data-metric`` (or ``data-section``/``data-key``) attributes,
so that a test, or a scraper, can find a number without depending on the layout.
"""

from __future__ import annotations

__all__ = ["dashboard_page"]

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>wisp metrics</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tr.group th { background: #e6ecf5; text-align: left; }
.muted { color: #888; } .bad { color: #b00; }
</style></head>
<body>
<h1>wisp</h1>
<p class="muted"><span id="status">waiting for the first summary</span> &middot;
updates every __REFRESH_S__ s &middot; <a href="/summary">/summary</a> &middot;
<a href="/metrics">/metrics</a></p>
<noscript><p class="bad">This page needs JavaScript; the same numbers are at
<a href="/summary">/summary</a>.</p></noscript>
<h2>Modes</h2><div id="modes"></div>
<p class="muted">live: the requests received in the last <span id="live-window">?</span> s;
latency percentiles over each mode's latest requests.</p>
<h2>Refusals</h2><div id="refusals"></div>
<h2>Verification batches (all modes)</h2><div id="batches"></div>
<h2>Scheduling by batch policy</h2><div id="schedule"></div>
<h2>Admission</h2><div id="admission"></div>
<h2>Errors</h2><div id="errors"></div>
<h2>Events</h2><div id="events"></div>
<script>
"use strict";
const REFRESH_MS = __REFRESH_MS__;
const DASH = "\\u2013";
const NO_SLO = "n/a \\u2014 no SLO";

const known = v => v !== null && v !== undefined;
const num = (v, digits) => known(v) ? Number(v).toFixed(digits) : DASH;
const count = v => known(v) ? String(v) : DASH;
const pct = v => known(v) ? (100 * v).toFixed(1) + " %" : DASH;
// Goodput is unknown (not 0) while no finished request carried an SLO.
const goodput = (m, v, digits) =>
  m.requests > 0 && m.requests_with_slo === 0 ? NO_SLO : num(v, digits);

// [group] or [metric key, label, value of one mode's summary]
const MODE_ROWS = [
  ["Throughput"],
  ["live_tokens_per_s", "output tokens/s (live)", m => num(m.live.tokens_per_s, 1)],
  ["live_requests_per_s", "requests/s (live)", m => num(m.live.requests_per_s, 2)],
  ["tokens_per_s", "output tokens/s (whole run)", m => num(m.throughput_tokens_per_s, 1)],
  ["requests", "requests finished", m => count(m.requests)],
  ["failed", "failed", m => count(m.failed)],
  ["refused", "refused", m => count(m.refused)],
  ["SLO"],
  ["slo_attainment", "SLO attainment", m => pct(m.slo_attainment)],
  ["requests_with_slo", "requests with an SLO", m => count(m.requests_with_slo)],
  ["requests_without_slo", "requests without an SLO", m => count(m.requests_without_slo)],
  ["goodput_tokens_per_s", "goodput tokens/s", m => goodput(m, m.goodput_tokens_per_s, 1)],
  ["goodput_requests_per_s", "goodput requests/s",
   m => goodput(m, m.goodput_requests_per_s, 2)],
  ["goodput_note", "note", m => m.goodput_note || ""],
  ["Latency (ms)"],
  ...["ttft", "tpot", "e2e"].flatMap(k => ["p50", "p90", "p99"].map(q =>
    [`${k}_${q}`, `${k.toUpperCase()} ${q}`, m => num(m[`${k}_ms`][q], 1)])),
  ["Verification"],
  ["batch_mean", "verifier batch size, mean", m => num(m.batch_size.mean, 2)],
  ...["p50", "p90", "p99"].map(q =>
    [`batch_${q}`, `verifier batch size ${q}`, m => num(m.batch_size[q], 1)]),
  ["rounds", "rounds", m => count(m.rounds)],
  ["acceptance_length", "acceptance length (accepted/round)",
   m => num(m.mean_acceptance_length, 2)],
  ["acceptance_rate", "acceptance rate", m => pct(m.acceptance_rate)],
  ["wasted_draft_s", "wasted drafting (WDT) s", m => num(m.wasted_draft_s, 3)],
];

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (known(text)) e.textContent = text;
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

// rows: arrays of cells; a cell is a string or [text, attributes]
function table(headers, rows, empty) {
  if (!rows.length) return el("p", empty, {class: "muted"});
  const t = el("table");
  const head = el("tr");
  headers.forEach(h => head.appendChild(el("th", h)));
  t.appendChild(head);
  for (const row of rows) {
    const tr = el("tr");
    for (const c of row) tr.appendChild(Array.isArray(c) ? el("td", c[0], c[1]) : el("td", c));
    t.appendChild(tr);
  }
  return t;
}

// One row of key -> value cells, tagged with the section for lookups.
function record(section, pairs) {
  return table(pairs.map(p => p[0]),
               [pairs.map(p => [p[2], {"data-section": section, "data-key": p[1]}])], "");
}

function modesTable(s) {
  const modes = Object.keys(s.modes);
  if (!modes.length) return el("p", "no requests yet", {class: "muted"});
  const t = el("table");
  const head = el("tr");
  head.appendChild(el("th", "mode"));
  modes.forEach(m => head.appendChild(el("th", m)));
  t.appendChild(head);
  for (const [key, label, value] of MODE_ROWS) {
    const tr = el("tr");
    if (!value) {
      tr.className = "group";
      tr.appendChild(el("th", key, {colspan: String(modes.length + 1)}));
    } else {
      tr.appendChild(el("td", label));
      for (const m of modes) {
        tr.appendChild(el("td", value(s.modes[m]), {"data-mode": m, "data-metric": key}));
      }
    }
    t.appendChild(tr);
  }
  return t;
}

function render(s) {
  const show = (id, node) => document.getElementById(id).replaceChildren(node);
  show("modes", modesTable(s));
  document.getElementById("live-window").textContent = String(s.live_window_s);
  const r = s.refusals;
  show("refusals", table(["mode", "code", "refused"], r.counts.map(c =>
    [c.mode, c.code, [count(c.count), {"data-mode": c.mode, "data-code": c.code}]]),
    "no refusals"));
  const b = s.batches;
  const depth = Object.entries(b.queue_depth).map(([v, d]) => `${v}: ${d}`).join(", ");
  show("batches", record("batches", [
    ["batches", "count", count(b.count)], ["mean size", "mean_size", num(b.mean_size, 2)],
    ["batch ms p50", "p50", num(b.batch_ms.p50, 2)], ["p90", "p90", num(b.batch_ms.p90, 2)],
    ["p99", "p99", num(b.batch_ms.p99, 2)], ["queue depth", "queue_depth", depth || DASH]]));
  show("schedule", table(
    ["policy", "batches", "predicted mean ms", "observed mean ms", "estimator MAPE",
     "bias ms", "guard ms", "deadlines met", "missed", "violation rate", "late dispatched",
     "decision p50 ms"],
    Object.entries(s.schedule).map(([p, x]) => [p, count(x.batches),
      num(x.predicted_ms.mean, 2), num(x.observed_ms.mean, 2), pct(x.estimator.mape),
      num(x.estimator.bias_ms, 2), num(x.guard_ms, 2), count(x.deadlines_met),
      count(x.deadlines_missed), pct(x.violation_rate), count(x.late_dispatched),
      num(x.decision_ms.p50, 3)]),
    "no scheduled batches yet"));
  const a = s.admission;
  show("admission", record("admission", [
    ["admitted", "admitted", count(a.admitted)], ["queued", "queued", count(a.queued)],
    ["refused", "refused", count(a.refused)],
    ["refusal rate", "refusal_rate", pct(a.refusal_rate)]]));
  show("errors", table(["service", "code", "count"],
    s.errors.map(e => [e.service, e.code, count(e.count)]), "no errors"));
  const ev = s.events;
  const kinds = [...new Set([...Object.keys(ev.received), ...Object.keys(ev.malformed)])];
  show("events", table(["kind", "received", "malformed"],
    kinds.sort().map(k => [k, count(ev.received[k] || 0), count(ev.malformed[k] || 0)]),
    "no events yet"));
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch("/summary", {cache: "no-store"});
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
    status.className = "";
    status.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {  // keep the last numbers on screen, say they are stale
    status.className = "bad";
    status.textContent = `cannot read /summary (${err.message}); retrying`;
  }
  setTimeout(poll, REFRESH_MS);
}
poll();
</script>
</body></html>
"""


def dashboard_page(refresh_s: float) -> str:
    """The dashboard's HTML, polling ``/summary`` every ``refresh_s`` seconds."""
    if not refresh_s > 0:
        raise ValueError(f"refresh_s must be > 0, got {refresh_s}")
    return (_PAGE.replace("__REFRESH_MS__", str(max(1, round(refresh_s * 1000))))
            .replace("__REFRESH_S__", f"{refresh_s:g}"))
