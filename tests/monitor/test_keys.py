"""The Redis key names: spelt only in monitor/keys.py, and spelt exactly as before (running
deployments and stored data read them)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from monitor import keys as keys_module
from monitor.keys import Keys

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("serving", "jobs", "monitor", "adapter")
OWNER = "monitor/keys.py"


# A key spelt by hand: a prefix variable (p, prefix, pfx or anything ending in `prefix`,
# possibly an attribute such as self.p or settings.redis.prefix) followed by ':', as an
# f-string, a str.format or %-template, or a concatenation.
_PREFIX = r"(?:[A-Za-z_][\w.]*\.)?(?:p|pfx|\w*prefix)"
KEY_SPELLING = re.compile(
    r"""\b[rRbB]?[fF][rRbB]?(['"])\{""" + _PREFIX + r"""\}:"""          # f"{prefix}:..."
    r"""|(['"])(?:\{\}|\{\d+\}|\{""" + _PREFIX + r"""\}|%s):[^'"]*\2\s*(?:\.format\(|%)"""  # "{}:x".format(p), "%s:x" % p
    r"""|\b""" + _PREFIX + r"""\s*\+\s*['"]:""")                          # prefix + ":x"


def spellings(root: Path = ROOT) -> list[str]:
    """file:line of every key spelt outside monitor/keys.py and the allowed folders."""
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel == OWNER:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if KEY_SPELLING.search(line):
                    out.append(f"{rel}:{n}: {line.strip()}")
    return out


def test_no_key_is_spelt_outside_monitor_keys():
    found = spellings()
    assert not found, "Redis keys spelt outside monitor/keys.py (use monitor.keys.Keys):\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    'key = f"{prefix}:monitor:drift"',
    'self.r.hexists(f"{self.p}:jobs:running", "finetune")',
    'key = f"{self.prefix}:rate:{what}:{ident.name}:{window}"',
    'key = f"{settings.redis.prefix}:rollout:webhook_secret"',
    "stream = f'{p}:shadow:samples'",
    'key = "{}:alerts".format(prefix)',
    'key = "%s:alerts" % self.prefix',
    'key = prefix + ":features"',
])
def test_the_scan_sees_a_key_spelt_by_hand(line):
    assert KEY_SPELLING.search(line)


@pytest.mark.parametrize("line", [
    'key = Keys(prefix).monitor_drift',
    'sample_id = f"{version}-{arm}-{i}"',
    'label = f"dense {row[key]:.3f}"',
    'url = f"redis://{host}:{port}/0"',
    'tempfile.mkdtemp(prefix="shadowgate-jobs-")',
])
def test_the_scan_passes_what_is_not_a_key(line):
    assert not KEY_SPELLING.search(line)


# member, its arguments (None: a property), the name for prefix "sg": the names as the
# service spelt them before monitor/keys.py (rate_log and rate_total came later, with the
# sliding-window rate limiter); every member of Keys has a row
EXPECTED = [
    ("control_state", None, "sg:control:state"),
    ("control_notify", None, "sg:control:notify"),
    ("control_history", None, "sg:control:history"),
    ("control_replicas", None, "sg:control:replicas"),
    ("shadow_samples", None, "sg:shadow:samples"),
    ("shadow_expiry", None, "sg:shadow:expiry"),
    ("features", None, "sg:features"),
    ("audit", ("r-1",), "sg:audit:r-1"),
    ("audit_shadow", ("r-1",), "sg:audit:r-1:shadow"),
    ("rate_log", ("tokens", "local"), "sg:rate:log:tokens:local"),
    ("rate_total", ("prompts", "local"), "sg:rate:total:prompts:local"),
    ("llm_timing", (4242,), "sg:llm:timing:4242"),
    ("llm_timing", ("*",), "sg:llm:timing:*"),
    ("monitor_lease", None, "sg:monitor:lease"),
    ("monitor_window", ("3", "challenger"), "sg:monitor:window:3:challenger"),
    ("monitor_window", ("*", "champion"), "sg:monitor:window:*:champion"),
    ("monitor_windows", None, "sg:monitor:window:*"),
    ("monitor_totals", None, "sg:monitor:totals"),
    ("monitor_features", ("3",), "sg:monitor:features:3"),
    ("monitor_feature_totals", None, "sg:monitor:feature_totals"),
    ("monitor_since_check", None, "sg:monitor:since_check"),
    ("monitor_drift", None, "sg:monitor:drift"),
    ("monitor_champion_seen", None, "sg:monitor:champion_seen"),
    ("monitor_fallback_seen", None, "sg:monitor:fallback_seen"),
    ("monitor_control_seen", None, "sg:monitor:control_seen"),
    ("monitor_summary", None, "sg:monitor:summary"),
    ("monitor_status", None, "sg:monitor:status"),
    ("alerts", None, "sg:alerts"),
    ("alerts_live", None, "sg:alerts:live"),
    ("alerts_dedup", ("fallback:3",), "sg:alerts:dedup:fallback:3"),
    ("alerts_suppressed", None, "sg:alerts:suppressed"),
    ("alerts_deliveries", None, "sg:alerts:deliveries"),
    ("jobs_running", None, "sg:jobs:running"),
    ("jobs_last", None, "sg:jobs:last"),
    ("jobs_history", None, "sg:jobs:history"),
    ("jobs_next", None, "sg:jobs:next"),
    ("jobs_lock", ("finetune",), "sg:jobs:lock:finetune"),
    ("rollout_state", None, "sg:rollout:state"),
    ("rollout_decisions", None, "sg:rollout:decisions"),
    ("rollout_commands", None, "sg:rollout:commands"),
    ("rollout_events", None, "sg:rollout:events"),
    ("rollout_webhook_secret", None, "sg:rollout:webhook_secret"),
    ("rollout_webhook_deliveries", None, "sg:rollout:webhook_deliveries"),
    ("bench_probe", None, "sg:bench:probe"),
]


@pytest.mark.parametrize("member,args,name", EXPECTED)
def test_key_names_are_the_ones_used_before(member, args, name):
    spelt = getattr(Keys("sg"), member)
    assert (spelt if args is None else spelt(*args)) == name


def _members() -> dict[str, str]:
    """Every key of Keys("P"), name parts as "<>"."""
    keys, out = Keys("P"), {}
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_") or name == "prefix":
            continue
        if isinstance(member, property):
            out[name] = getattr(keys, name)
        else:
            n_args = len(inspect.signature(member).parameters) - 1
            out[name] = getattr(keys, name)(*["<>"] * n_args)
    return out


def test_every_key_is_in_the_table_and_listed_in_the_module_docstring():
    members = _members()
    assert {member for member, _, _ in EXPECTED} == set(members)
    assert len(set(members.values())) == len(members)  # no two members spell the same key
    listed = {re.sub(r"<[^>]*>", "<>", m) for m in re.findall(r"^\s+(P:\S+)", keys_module.__doc__, re.M)}
    assert {v for v in members.values() if "*" not in v} == listed
