#!/usr/bin/env python3
"""Prints figures of a fanout-loadtest report.json as key=value, in order.

    python3 loadtest/figure.py <report.json> <key> [<key>...]

A key is found wherever it sits in the report (the first match, depth
first); a missing one prints as None.
"""
import json
import sys


def find(d, k):
    if isinstance(d, dict):
        if k in d:
            return d[k]
        for v in d.values():
            x = find(v, k)
            if x is not None:
                return x
    return None


report = json.load(open(sys.argv[1]))
print(" ".join(f"{k}={find(report, k)}" for k in sys.argv[2:]))
