"""Secrets never written: the one redaction applied wherever run records, manifests, logs, the report and wandb's
config are written.

What counts as a secret, as MLflow and wandb treat it:
- the value of a config key that has `key`, `token`, `secret`, `password` or `credential(s)` as a word of its
  name (`WANDB_API_KEY`, `hf_token`, `awsSecretAccessKey`; not `tokens` or `tokenizer`), at any depth;
- every value of an `env_vars` mapping (a runtime env's variables are credentials more often than not);
- the userinfo of a URI (`s3://KEY:SECRET@bucket/...`) and the secret-named query parameters of a URI
  (`?secret_key=...`);
- the value of an `${oc.env:NAME}` reference to a secret-named variable, or at a secret key.

A config is redacted by key (`redact_config`); every text written anywhere is redacted by value (`redact_text`):
each secret value this process has seen in a config is replaced wherever it appears, in logs and error messages
as in JSON. An `${oc.env:NAME}` value is replaced by the interpolation itself, so a record keeps
`${oc.env:HF_TOKEN}` and a resume resolves it from its own environment; any other secret becomes `<redacted>`,
which a resume takes from its own command line and config (`restore_redacted`), never from the record.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

REDACTED = "<redacted>"
SECRET_WORDS = frozenset({"key", "token", "secret", "password", "passwd", "credential", "credentials"})
ENV_VARS = "env_vars"
MIN_SECRET_CHARS = 8  # shorter values (NCCL_DEBUG: INFO) are redacted by key only: found in free text, they
# would blank out ordinary words wherever those appear
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
_SECRET_QUERY = re.compile(
    r"([?&][A-Za-z0-9_.-]*(?:key|token|secret|password|passwd|credentials?)[A-Za-z0-9_.-]*=)[^&#\s'\"]+", re.I
)
_OC_ENV = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")

# Secret values seen in this process, each with what replaces it.
_known: dict[str, str] = {}


def is_secret_key(name: str) -> bool:
    return any(word.lower() in SECRET_WORDS for word in _WORD_SPLIT.split(str(name)) if word)


def redact_text(text: str) -> str:
    """`text` with URI credentials and every known secret value replaced."""
    text = _SECRET_QUERY.sub(rf"\1{REDACTED}", _USERINFO.sub(rf"\1{REDACTED}@", text))
    for value in sorted(_known, key=len, reverse=True):
        if value in text:
            text = text.replace(value, _known[value])
    return text


def redact_strings(obj: Any) -> Any:
    """Every string (keys too) of a JSON-like tree through `redact_text`."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {redact_text(k) if isinstance(k, str) else k: redact_strings(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_strings(v) for v in obj]
    return obj


def redact_config(obj: Any) -> Any:
    """A config tree with its secrets replaced: by key, under `env_vars`, and by value (`redact_text`)."""
    return redact_strings(_by_key(obj, secret=False))


def _by_key(obj: Any, secret: bool) -> Any:
    if isinstance(obj, dict):
        return {k: _by_key(v, secret or is_secret_key(k) or k == ENV_VARS) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_by_key(v, secret) for v in obj]
    if not secret or obj is None or isinstance(obj, bool):
        return obj
    # An ${oc.env:...} reference is not the secret: it is kept, so a resume resolves it again.
    return _known[obj] if isinstance(obj, str) and _known.get(obj, REDACTED) != REDACTED else REDACTED


def secret_values(obj: Any, secret: bool = False) -> Iterable[str]:
    """The secret strings of a config tree (by key and under env_vars)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from secret_values(v, secret or is_secret_key(k) or k == ENV_VARS)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from secret_values(v, secret)
    elif secret and isinstance(obj, str | int | float) and not isinstance(obj, bool):
        yield str(obj)


def remember_config(resolved: Any, unresolved: Any) -> None:
    """Learn a composed config's secrets: by key from `resolved`, and the values of the `${oc.env:NAME}`
    references of `unresolved` (the tree before interpolation) that are secrets: a secret-named variable, or one
    at a secret key or under env_vars. Other references (`${oc.env:GPTLINE_STORE,store}`) are plain settings."""
    for text, secret in _strings(unresolved, secret=False):
        for name in _OC_ENV.findall(text):
            value = os.environ.get(name)
            if (secret or is_secret_key(name)) and value is not None and len(value) >= MIN_SECRET_CHARS:
                _known[value] = "${oc.env:" + name + "}"
    for text, _ in _strings(resolved, secret=False):  # URI credentials, also where a message quotes them alone
        for found in _USERINFO.finditer(text):
            remember(found.group(0)[len(found.group(1)) : -1].split(":"))
        remember(found.group(0)[len(found.group(1)) :] for found in _SECRET_QUERY.finditer(text))
    remember(secret_values(resolved))


def remember(values: Iterable[str]) -> None:
    """Literal secrets to replace by `<redacted>` wherever they appear (an oc.env value keeps its reference)."""
    for value in values:
        if len(value) >= MIN_SECRET_CHARS and value != REDACTED and value not in _known:
            _known[value] = REDACTED


def known() -> dict[str, str]:
    """This process's secrets and their replacements (a stage task takes them over from its driver)."""
    return dict(_known)


def learn(secrets: dict[str, str]) -> None:
    _known.update(secrets)


def _strings(obj: Any, secret: bool) -> Iterable[tuple[str, bool]]:
    """Each string of a tree, with whether it sits at a secret key or under env_vars."""
    if isinstance(obj, str):
        yield obj, secret
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, secret or is_secret_key(k) or k == ENV_VARS)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _strings(v, secret)


def restore_redacted(recorded: Any, local: Any, where: str = "") -> Any:
    """A recorded config with each `<redacted>` value taken from `local` (the config composed now, from this
    command line and this environment); a redacted value `local` does not have is an error naming its key."""
    from pipeline.errors import ConfigError

    if isinstance(recorded, dict):
        local = local if isinstance(local, dict) else {}
        return {k: restore_redacted(v, local.get(k), f"{where}{k}.") for k, v in recorded.items()}
    if isinstance(recorded, list):
        local = local if isinstance(local, list) and len(local) == len(recorded) else [None] * len(recorded)
        return [restore_redacted(v, w, f"{where}{i}.") for i, (v, w) in enumerate(zip(recorded, local, strict=True))]
    if recorded == REDACTED:
        if local is None or local == REDACTED:
            raise ConfigError(
                f"config key '{where.rstrip('.')}' is a secret the run record does not keep: give it again "
                "(an override, or ${oc.env:NAME} in the config) to resume"
            )
        return local
    return recorded
