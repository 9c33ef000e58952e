"""Checks Grafana dashboard JSON files against the Grafana Foundation SDK's dashboard model.

Each file is decoded into the SDK's typed model (dashboard, panels per panel type, Prometheus
queries, variables) and encoded again; every key and value of the file must survive the
round trip. A key the model does not know (a typo, a field of another schema version) or a
value of the wrong shape is lost or changed on the way and reported.

Usage: python3 grafana_model.py FILE...   (exit 1 and one line per problem when any fails)
"""

import json
import sys

from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard


def differences(given, back, path):
    if isinstance(given, dict):
        if not isinstance(back, dict):
            yield f"{path}: the model made {type(back).__name__} of an object"
            return
        for key, value in given.items():
            if key not in back:
                yield f"{path}.{key}: not in the model (dropped)"
            else:
                yield from differences(value, back[key], f"{path}.{key}")
    elif isinstance(given, list):
        if not isinstance(back, list) or len(back) != len(given):
            yield f"{path}: the model changed the list"
            return
        for i, (a, b) in enumerate(zip(given, back)):
            yield from differences(a, b, f"{path}[{i}]")
    elif given != back:
        yield f"{path}: {given!r} came back as {back!r}"


def main(files):
    plugins.register_default_plugins()
    problems = []
    for name in files:
        with open(name, encoding="utf-8") as f:
            given = json.load(f)
        try:
            model = Dashboard.from_json(given)
            back = json.loads(json.dumps(model, cls=JSONEncoder))
        except Exception as err:  # the model rejected the file's shape
            problems.append(f"{name}: does not decode: {err!r}")
            continue
        problems.extend(f"{name}: {p}" for p in differences(given, back, "$"))
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
