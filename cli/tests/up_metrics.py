"""Scrapes a `faasmoe up` stack's three /metrics endpoints (gateway, controller, broker) with
prometheus_client's text-format parser around a known number of requests, and checks that
the counters moved by exactly what the replies report. Run by cli/tests/up.rs with a JSON
config argument: {"base_url", "key", "model", "gateway", "controller", "broker"}."""
import json
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

cfg = json.loads(sys.argv[1])


def check(ok, what):
    if not ok:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def scrape(url):
    """{(sample name, frozenset(labels)): value} of every sample the endpoint serves."""
    with urllib.request.urlopen(url, timeout=30) as r:
        check(r.status == 200, f"{url} is 200")
        ctype = r.headers.get("content-type", "")
        check(ctype.startswith("text/plain"), f"{url} serves the text format ({ctype})")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(m, name, **labels):
    """Sum of a sample over every label set that includes `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= ls)


def has(m, name):
    return any(n == name for n, _ in m)


def complete(i, max_tokens):
    body = json.dumps({"model": cfg["model"], "prompt": f"Request {i}: once upon a time",
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(cfg["base_url"] + "/completions", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {cfg['key']}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["usage"]


P = "faasmoe_"
ends = {k: cfg[k] for k in ("gateway", "controller", "broker")}
before = {k: scrape(u) for k, u in ends.items()}
n = 3
usages = [complete(i, 5 + i) for i in range(n)]
after = {k: scrape(u) for k, u in ends.items()}
prompt = sum(u["prompt_tokens"] for u in usages)
gen = sum(u["completion_tokens"] for u in usages)
check(gen == 5 + 6 + 7, f"{n} requests generated {gen} tokens")


def delta(k, name, **labels):
    return total(after[k], name, **labels) - total(before[k], name, **labels)


for k in ("gateway", "controller"):
    check(delta(k, P + "prompt_tokens_total") == prompt, f"{k}: prompt tokens +{prompt}")
    check(delta(k, P + "generation_tokens_total") == gen, f"{k}: generation tokens +{gen}")
    check(delta(k, P + "e2e_request_latency_seconds_count") == n, f"{k}: e2e histogram +{n}")
    check(delta(k, P + "time_to_first_token_seconds_count") == n, f"{k}: TTFT histogram +{n}")
    check(delta(k, P + "inter_token_latency_seconds_count") == gen - n,
          f"{k}: inter-token latency +{gen - n} (one per token after the first)")
    check(delta(k, P + "request_success_total", finish_reason="length") == n,
          f"{k}: {n} requests finished by length")
    for b in ("time_to_first_token_seconds_bucket", "e2e_request_latency_seconds_bucket"):
        check(delta(k, P + b, le="+Inf") == n, f"{k}: {b}{{le=+Inf}} +{n}")
check(delta("gateway", P + "http_requests_total") >= n, "gateway: HTTP requests counted")
for g in ("num_requests_running", "num_requests_waiting"):
    check(has(after["controller"], P + g), f"controller: gauge {g}")
    check(total(after["controller"], P + g) == 0, f"controller: {g} is 0 when idle")

c, b = after["controller"], after["broker"]
calls = delta("controller", P + "function_requests_total")
check(calls > 0, f"controller: {calls} expert function requests")
check(total(c, P + "function_request_bytes_total") > 0, "controller: bytes sent")
starts = total(b, P + "function_cold_starts_total")
check(starts >= 1, f"broker: {starts} cold starts")
check(total(b, P + "function_cold_start_seconds_count") <= starts
      and total(b, P + "function_cold_start_seconds_count") >= 1, "broker: cold start durations observed")
check(total(b, P + "function_instances", state="ready") >= 1, "broker: ready instances")
# Warm requests: every function request reaches a worker once (no retries, no cold misses).
if delta("controller", P + "function_retries_total") == 0 and delta("controller", P + "function_cold_misses_total") == 0:
    # The broker asks the workers for their stats at each scrape (500 ms wait): on a loaded
    # machine a slow worker may miss one, so a few scrapes are allowed.
    for _ in range(5):
        served = delta("broker", P + "worker_requests_total")
        if served == calls:
            break
        time.sleep(1)
        after["broker"] = scrape(ends["broker"])
    check(served == calls, f"broker: workers served {served} requests, the controller sent {calls}")
    check(delta("broker", P + "worker_batches_total") >= 1, "broker: worker batches counted")
    check(delta("broker", P + "worker_rows_total") >= served, "broker: worker rows counted")
else:
    print("note: retries or cold misses during the warm round; skipping the exact worker count")
print("ALL OK")
