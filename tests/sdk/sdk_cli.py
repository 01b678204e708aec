"""The command line both SDK clients share: run the named scenarios, print their results."""

import argparse
import json
import ssl


def run(doc, scenarios, make_client):
    """Parses `--base-url`, `--api-key`, the transport options and scenario names, builds the
    client with `make_client(base_url, api_key, http)` and prints `{scenario: result}` as one
    JSON line. `http` holds the keyword arguments of the SDK's HTTP client (its
    `DefaultHttpxClient`): the TLS context trusting `--ca-file`, and `http2`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--ca-file", help="trust only this CA (PEM) for https:// base URLs")
    parser.add_argument("--http2", action="store_true", help="offer HTTP/2 (ALPN h2)")
    parser.add_argument("scenarios", nargs="+", choices=scenarios)
    args = parser.parse_args()
    http = {"http2": args.http2}
    if args.ca_file:
        http["verify"] = ssl.create_default_context(cafile=args.ca_file)
    client = make_client(args.base_url, args.api_key, http)
    print(json.dumps({name: scenarios[name](client) for name in args.scenarios}))
