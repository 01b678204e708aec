"""Drives Tether with the official Anthropic Python SDK, the way an application does.

    anthropic_client.py --base-url http://HOST:PORT --api-key KEY SCENARIO...

The SDK sends the key as `x-api-key`. Prints one JSON object on stdout: each scenario's name
and what the client saw. The Rust test (tests/e2e/sdk.rs) asserts on it; an unexpected
exception ends the script non-zero with its traceback on stderr.
"""


import anthropic

import sdk_cli

# Long enough to fill several of the replica's cache blocks.
SYSTEM = "You are a careful coding agent working in a large repository. " * 8
MESSAGES = [{"role": "user", "content": "hello from the anthropic sdk"}]


def usage(u):
    """The SDK's usage object, only the counters (newer SDKs add nested optional fields)."""
    return {
        key: getattr(u, key, None)
        for key in (
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "output_tokens",
        )
    }


def message(client):
    """`messages.create`, headers read off the raw response."""
    raw = client.messages.with_raw_response.create(
        model="sdk-anthropic-json",
        max_tokens=6,
        system=SYSTEM,
        messages=MESSAGES,
        extra_headers={"x-session-affinity": "sdk-anthropic-conversation"},
    )
    msg = raw.parse()
    return {
        "status": raw.status_code,
        "affinity": raw.headers.get("x-session-affinity-status"),
        "replica": raw.headers.get("x-replica-id"),
        "sent_x_api_key": "x-api-key" in raw.http_request.headers,
        "sent_authorization": "authorization" in raw.http_request.headers,
        "stop_reason": msg.stop_reason,
        "text": "".join(block.text for block in msg.content if block.type == "text"),
        "usage": usage(msg.usage),
    }


def stream_helper(client):
    """`messages.stream(...)`: text deltas, then the message the helper assembled."""
    with client.messages.stream(
        model="sdk-anthropic-stream", max_tokens=6, system=SYSTEM, messages=MESSAGES
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    return {"text": text, "stop_reason": final.stop_reason, "usage": usage(final.usage)}


def stream_events(client):
    """`messages.create(stream=True)`: the raw events, usage split between `message_start`
    and `message_delta` as the API sends it."""
    seen = {"events": [], "usage": {}}
    with client.messages.create(
        model="sdk-anthropic-events", max_tokens=6, system=SYSTEM, messages=MESSAGES, stream=True
    ) as events:
        for event in events:
            if not seen["events"] or seen["events"][-1] != event.type:
                seen["events"].append(event.type)
            if event.type == "message_start":
                seen["usage"] = usage(event.message.usage)
            elif event.type == "message_delta":
                seen["usage"]["output_tokens"] = event.usage.output_tokens
    return seen


def rejected(client):
    """A request whose key Tether does not know: the SDK's own exception, not a response."""
    try:
        client.messages.create(model="sdk-rejected", max_tokens=2, messages=MESSAGES)
    except anthropic.APIError as e:
        return {
            "error": type(e).__name__,
            "status": getattr(e, "status_code", None),
            "body": e.body,
        }
    return {"error": None}


SCENARIOS = {
    "message": message,
    "stream-helper": stream_helper,
    "stream-events": stream_events,
    "rejected": rejected,
}


def main():
    # No retries: a failure shows as it happened, at once.
    sdk_cli.run(
        __doc__,
        SCENARIOS,
        lambda base_url, api_key, http: anthropic.Anthropic(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            timeout=20,
            http_client=anthropic.DefaultHttpxClient(**http),
        ),
    )


if __name__ == "__main__":
    main()
