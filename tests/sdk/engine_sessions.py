"""Six agent sessions at once through Tether with the official OpenAI Python SDK, against real
inference engines.

    engine_sessions.py --base-url http://HOST:PORT/v1 --api-key KEY header tokenless

`header`: each session sends its own `x-session-affinity`; `tokenless`: the same sessions send
none. Each prints, per session, what every turn's response said: the model that answered (the
engines are started with their replica id as the model alias, so this names the replica),
Tether's `x-session-affinity-status` and the usage the engine reported. The Rust test
(tests/e2e/real_engines.rs) asserts on it and on the usage log.
"""

import concurrent.futures
import time

import openai

import sdk_cli

SESSIONS = 6
TURNS = 6


def agent_turn(run, session, turns):
    """Turn `turns` of agent `session`: its own long system prompt (an agent's context), then
    user and assistant messages. `run` starts the system prompt, so that the two runs share no
    prefix beyond the chat template's and the second cannot hit the first one's caches."""
    messages = [
        {
            "role": "system",
            "content": f"{run} agent {session} tools and instructions. " * 40,
        }
    ]
    for t in range(turns):
        messages.append({"role": "user", "content": f"step {t} of {session}: " * 12})
        if t + 1 < turns:
            messages.append({"role": "assistant", "content": f"did {t}"})
    return messages


def session_turns(client, run, session, token):
    # First turns start 20 ms apart, so that "at once" does not depend on two placements
    # landing in the same microsecond.
    time.sleep(0.02 * session)
    seen = []
    for turn in range(1, TURNS + 1):
        # An agent's tool call between turns, a different length each time.
        time.sleep(((session * 7 + turn * 13) % 5) * 0.08)
        headers = {"x-session-affinity": token} if token else {}
        raw = client.chat.completions.with_raw_response.create(
            model="agent",
            messages=agent_turn(run, session, turn),
            max_tokens=8,
            temperature=0,
            extra_headers=headers,
        )
        completion = raw.parse()
        usage = completion.usage
        details = usage.prompt_tokens_details
        seen.append(
            {
                "status": raw.status_code,
                "model": completion.model,
                "affinity": raw.headers.get("x-session-affinity-status"),
                "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": details.cached_tokens if details else None,
                "completion_tokens": usage.completion_tokens,
            }
        )
    return seen


def sessions(client, run, tokens):
    with concurrent.futures.ThreadPoolExecutor(max_workers=SESSIONS) as pool:
        futures = [
            pool.submit(
                session_turns, client, run, s, f"{run}-agent-{s}" if tokens else None
            )
            for s in range(SESSIONS)
        ]
        return [f.result() for f in futures]


def header(client):
    return sessions(client, "A", tokens=True)


def tokenless(client):
    return sessions(client, "B", tokens=False)


def make_client(base_url, api_key, http):
    # No retries: a retried turn would be metered twice and hide a failure.
    return openai.OpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=120,
        http_client=openai.DefaultHttpxClient(**http),
    )


if __name__ == "__main__":
    sdk_cli.run(__doc__, {"header": header, "tokenless": tokenless}, make_client)
