"""Issue 7, item 3: /metrics generated from the metrics registry (parsed with
prometheus-client's own parser), and the --http-address option."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from memcachefs.config import OPTIONS, load_config
from memcachefs.errors import ConfigError
from memcachefs.httpd import PREFIX, build_registry, default_collectors, metric_name
from memcachefs.metrics import all_metrics


def _snapshot() -> dict[str, object]:
    stats: dict[str, object] = {key: index for index, key in enumerate(all_metrics())}
    stats["mountpoint"] = "/data-fast"  # static strings are not samples
    return stats


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_every_registry_key_is_one_sample_with_its_value() -> None:
    stats = _snapshot()
    text = generate_latest(build_registry(lambda: stats, default_collectors())).decode()
    samples = _samples(text)
    for key, metric in all_metrics().items():
        if key.startswith("peer_errors_"):
            labels = (("kind", key.removeprefix("peer_errors_")),)
            assert samples["memcachefs_peer_errors_total", labels] == stats[key]
        else:
            assert samples[metric_name(key, metric.kind), ()] == stats[key], key
    for name, _ in samples:
        assert name.startswith(PREFIX)
    names = {name for name, _ in samples}
    assert "memcachefs_source_block_read_seconds_bucket" in names
    assert "memcachefs_peer_fetch_seconds_bucket" in names


def test_names_follow_the_prometheus_conventions() -> None:
    assert metric_name("evictions", "counter") == "memcachefs_evictions_total"
    assert metric_name("source_bytes", "counter") == "memcachefs_source_bytes_total"
    assert metric_name("used_bytes", "gauge") == "memcachefs_used_bytes"
    assert metric_name("uptime_s", "gauge") == "memcachefs_uptime_seconds"


def test_types_and_help_come_from_the_registry() -> None:
    text = generate_latest(build_registry(_snapshot)).decode()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["memcachefs_evictions"] == "counter"
    assert types["memcachefs_used_bytes"] == "gauge"
    assert types["memcachefs_peer_errors"] == "counter"
    assert f"# HELP memcachefs_used_bytes {all_metrics()['used_bytes'].help}" in text


def test_http_address_option() -> None:
    assert "http-address" in OPTIONS
    base = {"source": "/s", "mountpoint": "/m", "capacity": "64M"}
    config = load_config({**base, "http-address": "127.0.0.1:9100"}, environ={})
    assert config.http_address == ("127.0.0.1", 9100)
    assert load_config(base, environ={"MEMCACHEFS_HTTP_ADDRESS": "[::1]:80"}).http_address == (
        "::1",
        80,
    )
    assert load_config(base, environ={}).http_address is None
    with pytest.raises(ConfigError, match=r"^--http-address 'nowhere': "):
        load_config({**base, "http-address": "nowhere"}, environ={})


def test_the_readme_lists_the_prometheus_only_metrics() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("| Prometheus metric | type | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"^\| `(memcachefs_[a-z_]+)`", table, re.MULTILINE))
    text = generate_latest(build_registry(_snapshot, default_collectors())).decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    families = {name for name in families if not name.endswith("_created")}
    by_rule = {metric_name(key, "gauge") for key in all_metrics()}
    beyond = {f"{name}_total" if name == "memcachefs_peer_errors" else name for name in families}
    beyond -= by_rule | {f"{name}_total" for name in by_rule}
    assert documented == beyond
