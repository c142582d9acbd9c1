"""Fuzz the config check: TOML (tomllib) then agent.common.config.check_config (§6).

    python fuzz/fuzz_config.py fuzz/corpus/config -max_total_time=600

This is what ``load_config`` does after reading the file (it reports bytes
that are not UTF-8 as a ConfigError, so those inputs are skipped here). Only
tomllib.TOMLDecodeError and ConfigError may escape. An accepted config must
give every key its schema type and usable listen addresses.
"""

from __future__ import annotations

from _harness import fuzz, instrumented, known_bug

with instrumented(__name__ == "__main__"):
    import tomllib

    from agent.common.config import SCHEMA, check_config, parse_hostport
    from agent.common.errors import ConfigError


# Reported, reproducers in fuzz/known-crashes/config (skipped with FUZZ_SKIP_KNOWN=1)
KNOWN = [(ValueError, "invalid literal for int()"),   # listen = "127.0.0.1:²"
         (RecursionError, "")]                        # a = [[[[...]]]] (load_config)


def _load_config_refuses(data: bytes) -> None:
    import os
    import tempfile

    from agent.common.config import load_config

    fd, path = tempfile.mkstemp(suffix=".toml")
    try:
        os.write(fd, data)
        os.close(fd)
        try:
            load_config(path)
        except ConfigError:
            return
        raise AssertionError("load_config accepted a file tomllib cannot parse")
    finally:
        os.unlink(path)


def TestOneInput(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # load_config: "not valid TOML", a ConfigError
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    except RecursionError:
        # tomllib recurses per nesting level; what matters is what the agent
        # does with such a file: load_config must turn it into a ConfigError
        try:
            _load_config_refuses(data)
        except Exception as exc:
            if not known_bug(exc, KNOWN):
                raise
        return
    for require in (("agent",), ()):
        try:
            config = check_config(raw, "fuzz.toml", require)
        except ConfigError as exc:
            assert "fuzz.toml" in str(exc), f"a config error not naming the file: {exc}"
            continue
        except Exception as exc:
            if known_bug(exc, KNOWN):
                return
            raise
        for section, values in config.sections.items():
            for key, value in values.items():
                kind = SCHEMA[section][key][0]
                assert type(value) is kind, (section, key, value)
        for section in ("objecthost", "cta"):
            host, port = parse_hostport(config.get(section, "listen"), section)
            assert isinstance(host, str) and type(port) is int and 0 <= port <= 65535
        assert set(config.handlers) == set(SCHEMA["handlers"])
        if all(config.get("agent", k) for k in ("client_id", "token", "tickle_key")):
            assert isinstance(config.credentials().tickle_key, bytes)


if __name__ == "__main__":
    fuzz(TestOneInput)
