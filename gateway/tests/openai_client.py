"""The official `openai` package against faasmoe-gateway (run by gateway/tests/openai_http.rs).

argv[1]: a JSON object with base_url, model, key (unlimited tenant), poor_key (a tenant over
quota), nofn_key (a tenant whose controller has no expert function), prompt_ids, greedy_ids,
template_cases (the cases of ../shared/fixtures/chat-template-golden.json) and template_keys
(per template name, the key of a tenant whose controller's checkpoint carries that template).
Exits non-zero with a message on the first failed check; prints the checks that passed.
"""

import json
import sys
import urllib.error
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

cfg = json.loads(sys.argv[1])
base = cfg["base_url"]  # http://host:port/v1
root = base[: -len("/v1")]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def raw(method, path, body=None, key=None, data=None):
    """(status, headers, parsed JSON or text) of a raw HTTP request."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if data is None and body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(root + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, hdrs, text = r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, dict(e.headers), e.read().decode()
    try:
        return status, hdrs, json.loads(text)
    except ValueError:
        return status, hdrs, text


def metrics():
    _, _, text = raw("GET", "/metrics")
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + json.dumps(s.labels, sort_keys=True) if s.labels else s.name
            out[key] = out.get(key, 0.0) + s.value
    return out


def is_openai_error(body, code):
    e = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(e, dict)
        and set(e) == {"message", "type", "param", "code"}
        and e["code"] == code
        and isinstance(e["message"], str)
        and e["message"]
    )


client = openai.OpenAI(base_url=base, api_key=cfg["key"], max_retries=0, timeout=120)
model = cfg["model"]

status, _, body = raw("GET", "/health")
check(status == 200 and body["status"] == "ok", f"/health is 200 with a controller: {body}")

ids = [m.id for m in client.models.list().data]
check(ids == [model], f"models.list names the served model: {ids}")

before = metrics()

# Greedy ids over HTTP equal the fixture's goldens (a raw completion with token ids).
n = len(cfg["greedy_ids"])
c = client.completions.create(
    model=model,
    prompt=cfg["prompt_ids"],
    max_tokens=n,
    temperature=0,
    extra_body={"return_token_ids": True},
)
got = c.choices[0].model_extra["token_ids"]
check(got == cfg["greedy_ids"], f"greedy completion ids equal the goldens ({len(got)} tokens)")
check(c.usage.prompt_tokens == len(cfg["prompt_ids"]) and c.usage.completion_tokens == n, f"completion usage {c.usage}")
check(c.object == "text_completion" and c.id.startswith("cmpl-"), "completion object and id")

# Streamed completion text equals the non-streamed one.
s_text = "".join(
    ch.choices[0].text
    for ch in client.completions.create(
        model=model, prompt=cfg["prompt_ids"], max_tokens=n, temperature=0, stream=True
    )
    if ch.choices
)
check(s_text == c.choices[0].text, "streamed completion text equals the non-streamed text")

# Chat with and without streaming: the same text; usage last with include_usage.
msgs = [{"role": "user", "content": "Hello, who are you?"}]
chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
text = chat.choices[0].message.content
check(chat.object == "chat.completion" and chat.choices[0].message.role == "assistant", "chat completion shape")
check(chat.usage.completion_tokens >= 1 and chat.choices[0].finish_reason in ("stop", "length"), f"chat usage {chat.usage}")
chunks = list(
    client.chat.completions.create(
        model=model,
        messages=msgs,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
check(streamed == text, f"streamed chat text equals the non-streamed text: {streamed!r} vs {text!r}")
check(chunks[0].choices[0].delta.role == "assistant", "first chunk carries the role")
check(chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chat.usage.total_tokens, "usage comes last")
check(all(ch.usage is None for ch in chunks[:-1]), "usage is null on the other chunks")
finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
check(finishes == [chat.choices[0].finish_reason], f"one finish_reason: {finishes}")

# Metrics moved by the requests and tokens just served (4 generations).
after = metrics()
prompt_tokens = 2 * len(cfg["prompt_ids"]) + 2 * chat.usage.prompt_tokens
gen_tokens = 2 * n + 2 * chat.usage.completion_tokens
d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)
check(d("faasmoe_prompt_tokens_total") == prompt_tokens, f"prompt token counter +{prompt_tokens}: {d('faasmoe_prompt_tokens_total')}")
check(d("faasmoe_generation_tokens_total") == gen_tokens, f"generation token counter +{gen_tokens}: {d('faasmoe_generation_tokens_total')}")
check(d("faasmoe_e2e_request_latency_seconds_count") == 4, "e2e latency histogram counted 4 requests")
check(d("faasmoe_time_to_first_token_seconds_count") == 4, "TTFT histogram counted 4 requests")
check(d("faasmoe_inter_token_latency_seconds_count") >= 4 * (min(n, 8) - 1) - 8, "inter-token latency observed")

# Every chat-template golden case gives transformers' prompt ids through the API (the
# template controllers pass custom roles such as `robot` to the template, as transformers
# does); its error cases are refused with the template's own message.
matched = refused = 0
for i, case in enumerate(cfg["template_cases"]):
    tc = openai.OpenAI(base_url=base, api_key=cfg["template_keys"][case["template"]], max_retries=0, timeout=120)
    what = f"template case {i} ({case['template']}, roles {[m['role'] for m in case['messages']]})"
    try:
        r = tc.chat.completions.create(
            model=model, messages=case["messages"], max_tokens=1, temperature=0,
            extra_body={"return_token_ids": True},
        )
    except openai.BadRequestError as e:
        msg = e.body["message"]
        check("error" in case, f"{what} refused: {msg}")
        check(case["error"] in msg, f"{what}: the message is the template's: {msg}")
        refused += 1
        continue
    check("error" not in case, f"{what} is accepted")
    got = r.model_extra["prompt_token_ids"]
    check(got == case["input_ids"], f"{what}: prompt ids equal transformers' ({len(got)} tokens)")
    check(r.usage.prompt_tokens == len(case["input_ids"]), f"{what}: usage counts the templated prompt")
    matched += 1
errors = sum("error" in c for c in cfg["template_cases"])
check(refused == errors and matched + refused == len(cfg["template_cases"]) and matched >= 15,
      f"{matched} template cases matched, {refused} error cases refused")

# Errors: status and OpenAI body.
status, hdrs, body = raw("POST", "/v1/chat/completions", data=b"{not json", key=cfg["key"])
check(status == 400 and is_openai_error(body, "bad_request"), f"bad JSON is 400: {body}")
check(hdrs.get("x-request-id"), "x-request-id on every response")
status, hdrs, body = raw("POST", "/v1/completions", {"model": model, "prompt": "x"}, key=None)
check(status == 401 and is_openai_error(body, "invalid_api_key"), f"missing key is 401: {body}")
try:
    openai.OpenAI(base_url=base, api_key="fm-alice.wrong", max_retries=0).models.list()
    check(False, "a wrong key must be refused")
except openai.AuthenticationError as e:
    check(e.status_code == 401 and e.body["code"] == "invalid_api_key", "wrong key is 401")
try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    check(False, "an unknown model must be refused")
except openai.NotFoundError as e:
    check(e.status_code == 404 and e.body["code"] == "model_not_found", "unknown model is 404")
try:
    client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "x"}])
    check(False, "an unknown role must be refused")
except openai.BadRequestError as e:
    check(e.status_code == 400 and "wizard" in e.body["message"], f"unknown role is 400 naming it: {e.body}")
try:
    client.chat.completions.create(model=model, messages=msgs, n=2)
    check(False, "n=2 must be refused")
except openai.BadRequestError as e:
    check(e.body["param"] == "n", "an unsupported field is 400 naming it")
poor = openai.OpenAI(base_url=base, api_key=cfg["poor_key"], max_retries=0, timeout=120)
for stream in (False, True):
    try:
        r = poor.completions.create(model=model, prompt=cfg["prompt_ids"], max_tokens=4, stream=stream)
        list(r) if stream else None
        check(False, "over quota must be refused")
    except openai.RateLimitError as e:
        check(
            e.status_code == 429 and e.body["code"] == "quota_exceeded" and int(e.response.headers["retry-after"]) >= 1,
            f"over quota is 429 with Retry-After (stream={stream})",
        )
nofn = openai.OpenAI(base_url=base, api_key=cfg["nofn_key"], max_retries=0, timeout=120)
try:
    nofn.completions.create(model=model, prompt=cfg["prompt_ids"], max_tokens=2)
    check(False, "no expert function must be refused")
except openai.APIStatusError as e:
    check(e.status_code == 503 and e.body["code"] == "unavailable", f"no expert function is 503: {e.body}")
# A key naming a tenant too long for a subject is a 401 and never reaches NATS (nats-server
# would close the gateway's shared connection over a 4 KB control line), so a stream that
# runs meanwhile is unaffected.
import threading
import time
streamed = {}
def long_stream():
    s = client.completions.create(model=model, prompt=cfg["prompt_ids"], max_tokens=64, temperature=0, stream=True)
    streamed["text"] = "".join(c.choices[0].text for c in s if c.choices)
t = threading.Thread(target=long_stream)
t.start()
time.sleep(0.3)
status, _, body = raw("GET", "/v1/models", key="fm-" + "a" * 4000 + ".x")
check(status == 401 and is_openai_error(body, "invalid_api_key"), f"a 4 KB tenant name in a key is 401: {status}")
t.join(timeout=120)
check(not t.is_alive() and len(streamed.get("text", "")) > 0, "a stream running meanwhile completes")
# Another tenant's key does not reach this tenant's quota: alice still gets served.
c = client.completions.create(model=model, prompt=cfg["prompt_ids"], max_tokens=2, temperature=0)
check(c.usage.completion_tokens == 2, "the unlimited tenant is still served after the others' refusals")
print("ALL OK")
