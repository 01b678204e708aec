"""Drives Tether with the official OpenAI Python SDK, the way an application does.

    openai_client.py --base-url http://HOST:PORT/v1 --api-key KEY SCENARIO...

Prints one JSON object on stdout: each scenario's name and what the client saw. The Rust
test (tests/e2e/sdk.rs) asserts on it; an unexpected exception ends the script non-zero with
its traceback on stderr.
"""

import inspect

import openai

import sdk_cli

# Long enough to fill several of the replica's cache blocks, so a warm turn shows cached tokens.
SYSTEM = "You are a careful coding agent working in a large repository. " * 8


def conversation(turn):
    messages = [{"role": "system", "content": SYSTEM}]
    for step in range(turn + 1):
        messages.append({"role": "user", "content": f"step {step}, please continue"})
        if step < turn:
            messages.append({"role": "assistant", "content": f"done with step {step}"})
    return messages


def turns(client):
    """Two turns of one conversation under one session token, headers read off the raw
    response."""
    seen = []
    for turn in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="sdk-turns",
            messages=conversation(turn),
            max_tokens=8,
            extra_headers={"x-session-affinity": "sdk-openai-conversation"},
        )
        completion = raw.parse()
        seen.append(
            {
                "status": raw.status_code,
                "affinity": raw.headers.get("x-session-affinity-status"),
                "replica": raw.headers.get("x-replica-id"),
                "sent_authorization": "authorization" in raw.http_request.headers,
                "finish_reason": completion.choices[0].finish_reason,
                "usage": completion.usage.model_dump(),
            }
        )
    return seen


def stream(client):
    """A stream that did not ask for usage (no `stream_options`): every chunk as the SDK
    yields it."""
    seen = {"chunks": 0, "usage_chunks": 0, "empty_chunks": 0, "text": "", "finish_reason": None}
    with client.chat.completions.create(
        model="sdk-stream", messages=conversation(0), max_tokens=6, stream=True
    ) as chunks:
        for chunk in chunks:
            seen["chunks"] += 1
            if chunk.usage is not None:
                seen["usage_chunks"] += 1
            if not chunk.choices:
                seen["empty_chunks"] += 1
                continue
            seen["text"] += chunk.choices[0].delta.content or ""
            seen["finish_reason"] = chunk.choices[0].finish_reason or seen["finish_reason"]
    return seen


def protocol(client):
    """A streamed and a plain completion, each with the HTTP version it travelled over."""
    seen = {}
    with client.chat.completions.with_streaming_response.create(
        model="sdk-protocol-stream", messages=conversation(0), max_tokens=5, stream=True
    ) as raw:
        text = ""
        chunks = 0
        for chunk in raw.parse():
            chunks += 1
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        seen["stream"] = {
            "status": raw.status_code,
            "http_version": raw.http_response.http_version,
            "chunks": chunks,
            "text": text,
        }
    raw = client.chat.completions.with_raw_response.create(
        model="sdk-protocol-json", messages=conversation(0), max_tokens=3
    )
    completion = raw.parse()
    seen["json"] = {
        "status": raw.status_code,
        "http_version": raw.http_response.http_version,
        "usage": completion.usage.model_dump(),
    }
    return seen


def prompt_cache_key(client):
    """OpenAI's own cache-routing hint, as a parameter where this SDK version has one."""
    key = "sdk-prompt-cache-key"
    if "prompt_cache_key" in inspect.signature(client.chat.completions.create).parameters:
        extra = {"prompt_cache_key": key}
    else:
        extra = {"extra_body": {"prompt_cache_key": key}}
    completion = client.chat.completions.create(
        model="sdk-cache-key", messages=conversation(0), max_tokens=4, **extra
    )
    return {
        "content": completion.choices[0].message.content,
        "usage": completion.usage.model_dump(),
    }


def session_ids(client):
    """Two turns of a conversation named three ways: `prompt_cache_key` alone, an agent's own
    session header alone (through `extra_headers`), and the affinity header."""
    if "prompt_cache_key" in inspect.signature(client.chat.completions.create).parameters:
        by_cache_key = {"prompt_cache_key": "sdk-ids-conversation-1"}
    else:
        by_cache_key = {"extra_body": {"prompt_cache_key": "sdk-ids-conversation-1"}}
    ways = {
        "prompt_cache_key": ("sdk-ids-pck", by_cache_key),
        "agent_header": (
            "sdk-ids-agent",
            {"extra_headers": {"X-Claude-Code-Session-Id": "sdk-ids-conversation-2"}},
        ),
        "header": (
            "sdk-ids-header",
            {"extra_headers": {"x-session-affinity": "sdk-ids-conversation-3"}},
        ),
    }
    seen = {}
    for way, (model, extra) in ways.items():
        seen[way] = []
        for turn in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=conversation(turn), max_tokens=4, **extra
            )
            raw.parse()
            seen[way].append(
                {
                    "status": raw.status_code,
                    "affinity": raw.headers.get("x-session-affinity-status"),
                    "replica": raw.headers.get("x-replica-id"),
                }
            )
    return seen


def rejected(client):
    """A request whose key Tether does not know: the SDK's own exception, not a response."""
    try:
        client.chat.completions.create(model="sdk-rejected", messages=conversation(0), max_tokens=2)
    except openai.APIError as e:
        return {
            "error": type(e).__name__,
            "status": getattr(e, "status_code", None),
            "code": e.code,
        }
    return {"error": None}


SCENARIOS = {
    "turns": turns,
    "stream": stream,
    "protocol": protocol,
    "prompt-cache-key": prompt_cache_key,
    "session-ids": session_ids,
    "rejected": rejected,
}


def main():
    # No retries: a failure shows as it happened, at once.
    sdk_cli.run(
        __doc__,
        SCENARIOS,
        lambda base_url, api_key, http: openai.OpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            timeout=20,
            http_client=openai.DefaultHttpxClient(**http),
        ),
    )


if __name__ == "__main__":
    main()
