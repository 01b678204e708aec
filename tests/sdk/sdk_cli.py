"""The command line both SDK clients share: run the named scenarios, print their results."""

import argparse
import json


def run(doc, scenarios, make_client):
    """Parses `--base-url`, `--api-key` and scenario names, builds the client with
    `make_client(base_url, api_key)`, and prints `{scenario: result}` as one JSON line."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("scenarios", nargs="+", choices=scenarios)
    args = parser.parse_args()
    client = make_client(args.base_url, args.api_key)
    print(json.dumps({name: scenarios[name](client) for name in args.scenarios}))
