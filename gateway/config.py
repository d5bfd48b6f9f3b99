"""The config file: pydantic models, `${ENV}` substitution and errors that name the key path.

Each protocol's device model lives beside its collector, each output's settings beside the
publishers; this module composes them: the devices with a discriminated union on
`protocol:` (the protocol registry, gateway.collectors.registry), the outputs from `outputs:`
or its shorthand `mqtt:`. `ConfigFile` is the file as written, `Settings` what load makes of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import reprlib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import ConfigDict, Field, Strict, ValidationError, model_validator

from gateway import tls, yamlload
from gateway.collectors import DeviceSettings
from gateway.collectors.registry import PROTOCOLS, Device, by_protocol
from gateway.errors import ConfigError
from gateway.http.settings import HttpSettings
from gateway.model import AssetPath
from gateway.publishers import topics
from gateway.publishers.azure import read_device_key
from gateway.publishers.settings import MqttSettings, OutputSettings, SparkplugSettings
from gateway.settings_types import (
    INT_FROM_ENV,
    SECRET_FILE,
    EnvText,
    Int,
    Model,
    ProblemAt,
    Segment,
    check_unique,
    home,
    read_secret,
    resolve_file,
    shown,
)

__all__ = [  # the output models are re-exported: the config's public API, and their old home
    "ConfigFile", "GatewaySettings", "MqttSettings", "OutboxSettings", "OutputSettings", "Settings",
    "SparkplugSettings", "load", "parse", "schema",
]  # fmt: skip

DEVICE_PROTOCOLS = tuple(PROTOCOLS)
SHORTHAND = "mqtt"  # the name of the one output that `mqtt:` gives


class GatewaySettings(Model):
    id: Segment = Field(description="This gateway's id; used in its status topic and MQTT client id.")
    enterprise: Segment = Field(description="ISA-95 enterprise: first segment of every topic.")
    site: Segment = Field(description="ISA-95 site.")
    area: Segment = Field(description="ISA-95 area.")
    line: Segment = Field(description="ISA-95 line (work center).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log verbosity."
    )
    pki_dir: Path | None = Field(
        default=None,
        description="Where the OPC UA client certificate and key are kept (created on first run). "
        "Default: pki/ beside the outbox file.",
    )


class OutboxSettings(Model):
    path: Path = Field(description="SQLite file of the store-and-forward buffer; created if missing.")
    max_rows: Int = Field(
        default=1_000_000, ge=100, description="Most readings kept while the broker is away."
    )
    max_bytes: Annotated[int, Strict(), Field(ge=1_000_000), INT_FROM_ENV] | None = Field(
        default=None, description="Optional cap on the database and its WAL, in bytes."
    )
    policy: Literal["drop_oldest", "drop_newest"] = Field(
        default="drop_oldest",
        description="What to drop when full: the oldest buffered readings, or the new ones. "
        "Every dropped reading is counted and logged.",
    )


def _one_output_form(schema: dict[str, Any]) -> None:
    """The schema says what `_shorthand` does: mqtt: or outputs:, exactly one of them."""
    schema["required"].remove("outputs")
    schema["oneOf"] = [{"required": ["mqtt"]}, {"required": ["outputs"]}]


class ConfigFile(Model):
    """The config file as written: what `millwright schema` describes and load validates."""

    model_config = ConfigDict(json_schema_extra=_one_output_form)

    gateway: GatewaySettings
    outbox: OutboxSettings
    http: HttpSettings = Field(
        default_factory=HttpSettings,
        description="The status server: health checks, Prometheus metrics and the JSON status.",
    )
    mqtt: MqttSettings | None = Field(
        default=None,
        description=f"A single output: the shorthand for outputs: with one entry, named {SHORTHAND}.",
    )
    # Required unless mqtt: is given (see _shorthand).
    outputs: Annotated[list[OutputSettings], Field(min_length=1)] | None = Field(
        description="Where the readings go: each output is a broker and the format published to it, "
        "and keeps its own place in the outbox. Or mqtt:, for a single output."
    )
    devices: list[Device] = Field(min_length=1, description="Devices to collect from.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # outputs: is a required key that mqtt: stands in for: a file with neither is then
        # told so as a missing key, together with its other problems.
        if isinstance(data, dict) and "mqtt" in data and "outputs" not in data:
            return {**data, "outputs": None}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.mqtt is not None and self.outputs is not None:
            raise ProblemAt(
                ("mqtt",),
                "give mqtt: (a single output) or outputs: (a list), not both: move it into outputs:, "
                "with a name",
            )
        if self.mqtt is None and self.outputs is None:  # `mqtt:` or `outputs:` with no value
            if "mqtt" in self.model_fields_set:
                raise ProblemAt(("mqtt",), "expected a mapping (key: value), not null (an empty value)")
            raise ProblemAt(
                ("outputs",),
                "expected a list of outputs, not null (an empty value); or mqtt: for a single output",
            )
        outputs = list(self.resolved_outputs())
        _check_outputs(outputs)
        for loc, output in outputs:
            _check_topics(loc, output, self.gateway, self.devices)
        check_unique((d.name for d in self.devices), "device")
        for name, group in by_protocol(self.devices).items():
            PROTOCOLS[name].check_together(group)
        if any(o.format == "sparkplug" for _, o in outputs):
            # Sparkplug ids and metric names should not differ only in case: some hosts
            # fold case, and two devices (or tags) would then become one.
            check_unique((d.name.lower() for d in self.devices), "device (ignoring case)")
            for device in self.devices:
                check_unique((t.name.lower() for t in device.tags), f"{device.name}: tag (ignoring case)")
        return self

    def resolved_outputs(self) -> Iterator[tuple[tuple[str | int, ...], OutputSettings]]:
        """Each output with its key path (`mqtt` for the shorthand, `outputs[i]`), with the
        defaults that depend on the rest of the file filled in: the client id and a Sparkplug
        output's edge node id (the gateway id)."""
        gateway = self.gateway.id
        if self.outputs is None:
            assert self.mqtt is not None  # (see _consistent)
            # The shorthand keeps the client id it always had: a broker that allows (an ACL)
            # or remembers (a persistent session) the client by it sees no change.
            yield (
                ("mqtt",),
                _defaults(
                    OutputSettings(name=SHORTHAND, **dict(self.mqtt)), f"millwright-{gateway}", gateway
                ),
            )
            return
        for i, output in enumerate(self.outputs):
            # One client id per output: two outputs to the same broker must not share one
            # (the broker would disconnect each when the other connects), and naming each
            # output is enough to keep them apart.
            yield ("outputs", i), _defaults(output, f"millwright-{gateway}-{output.name}", gateway)


def _defaults(output: OutputSettings, client_id: str, edge_node_id: str) -> OutputSettings:
    update: dict[str, Any] = {}
    if output.client_id is None:
        update["client_id"] = client_id
    if output.sparkplug is not None and output.sparkplug.edge_node_id is None:
        update["sparkplug"] = output.sparkplug.model_copy(update={"edge_node_id": edge_node_id})
    return output.model_copy(update=update) if update else output


def _check_outputs(outputs: list[tuple[tuple[str | int, ...], OutputSettings]]) -> None:
    """Raise ProblemAt for the first output that a broker could not tell from an earlier one."""
    names: dict[str, str] = {}
    sessions: dict[tuple[str, int, str | None], str] = {}
    nodes: dict[tuple[str, int, str, str], str] = {}
    for loc, output in outputs:
        where = _key_path(loc)
        if output.name in names:
            raise ProblemAt((*loc, "name"), f"the output name {output.name!r} is used twice")
        names[output.name] = where
        broker = f"{shown(output.host)}:{output.port}"
        session = (output.host, output.port, output.client_id)
        if (first := sessions.setdefault(session, where)) != where:
            raise ProblemAt(
                loc,
                f"the same broker ({broker}) and client id ({output.client_id!r}) as {first}: the broker "
                "would disconnect one whenever the other connects; give one of them its own client_id",
            )
        sparkplug = output.sparkplug
        if sparkplug is not None and sparkplug.edge_node_id is not None:
            # Ignoring case, as for device names: some hosts fold it.
            node = (output.host, output.port, sparkplug.group_id.lower(), sparkplug.edge_node_id.lower())
            if (first := nodes.setdefault(node, where)) != where:
                raise ProblemAt(
                    loc,
                    f"the same Sparkplug edge node as {first} (group {sparkplug.group_id!r}, edge node "
                    f"{sparkplug.edge_node_id!r} on {broker}): the host would take the births and deaths "
                    "of both for one node's; give one of them its own sparkplug.edge_node_id",
                )


def _check_topics(
    loc: tuple[str | int, ...], output: OutputSettings, gateway: GatewaySettings, devices: list[Device]
) -> None:
    """Raise ProblemAt for the first topic the output would publish on that its platform
    does not take (too long, too deep), naming the key that decides it."""
    p = output.profile
    if p.topic_bytes is None and p.topic_slashes is None:
        return
    for topic, key in _published_topics(output, gateway, devices):
        problem = topics.limit_problem(topic, p.topic_bytes, p.topic_slashes, p.free_prefix)
        if problem is not None:
            fix = "give topic: a shorter template" if key in ((), ("topic",)) else "shorten the names in it"
            where = key if key[:1] == ("gateway",) else (*loc, *key)  # the gateway's keys are its own
            raise ProblemAt(where, f"the topic {shown(topic, 100)} {problem}, which {p.title} refuses: {fix}")


def _published_topics(
    output: OutputSettings, gateway: GatewaySettings, devices: list[Device]
) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Every topic the output publishes on, with the key that decides it."""
    g = gateway
    if output.format == "sparkplug":
        assert output.sparkplug is not None
        group, node = output.sparkplug.group_id, output.sparkplug.edge_node_id or g.id
        yield f"spBv1.0/{group}/NDEATH/{node}", ("sparkplug", "group_id")
        for d in devices:
            yield f"spBv1.0/{group}/DBIRTH/{node}/{d.name}", ("sparkplug", "group_id")
        return
    if not output.profile.own_topic:
        return  # the platform's own topic
    template = output.template
    # The template's key, or the output's when it has the default template (no topic: key).
    key: tuple[str, ...] = ("topic",) if output.topic is not None else ()
    if output.profile.status:
        yield f"{g.enterprise}/{g.site}/_gateway/{g.id}/status", ("gateway", "id")
    for d in devices:
        asset = asset_of(g, d)
        tags = [t.name for t in d.tags] if "tag" in template.fields else []
        for tag in [*tags, "_meta"] if tags else [""]:
            yield template.render(asset, g.id, tag), key
        if not tags and output.profile.status:
            yield f"{template.render(asset, g.id)}/_meta", key


def asset_of(gateway: GatewaySettings, device: DeviceSettings) -> AssetPath:
    """The device's ISA-95 path: its own levels where it sets them, the gateway's elsewhere."""
    g, o = gateway, device.asset
    return AssetPath(
        o.enterprise or g.enterprise, o.site or g.site, o.area or g.area, o.line or g.line, device.name
    )


class Settings(Model):
    """The config the gateway runs, as load makes it of a ConfigFile: every output in
    `outputs` (the mqtt: shorthand as the one output named mqtt), with its client id and (a
    Sparkplug output) its edge node id filled in; relative paths resolved against the config
    file's folder. Made by load only: the checks across sections are ConfigFile's."""

    gateway: GatewaySettings
    outbox: OutboxSettings
    http: HttpSettings = Field(default_factory=HttpSettings)
    outputs: tuple[OutputSettings, ...] = Field(min_length=1, description="Every output, in file order.")
    devices: list[Device] = Field(min_length=1, description="Devices to collect from.")

    @property
    def pki_dir(self) -> Path:
        return self.gateway.pki_dir or self.outbox.path.parent / "pki"

    def asset(self, device: DeviceSettings) -> AssetPath:
        return asset_of(self.gateway, device)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(node: Any, loc: tuple[Any, ...], env: dict[str, str], missing: list[tuple[Any, ...]]) -> Any:
    """Replace ${NAME} in every string value; each missing variable is noted in `missing`
    as (*location, NAME), its location as it came (see `_in_document`)."""
    if isinstance(node, dict):
        return {k: _expand(v, (*loc, k), env, missing) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, (*loc, i), env, missing) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                missing.append((*loc, name))
                return ""
            return env[name]

        return EnvText(_ENV.sub(sub, node))
    return node


def _in_document(doc: Any, loc: tuple[Any, ...]) -> tuple[str | int, ...]:
    """`loc` with each mapping key that is not text (`1:`, `null:`) as written, so that
    _key_path does not take it for a list index. Walks the document, only for an error:
    _expand's loop stays free of the check."""
    out: list[str | int] = []
    for part in loc:
        out.append(part if isinstance(doc, list) or isinstance(part, str) else repr(part))
        doc = doc[part]
    return tuple(out)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def _key_path(loc: tuple[str | int, ...]) -> str:
    """('devices', 0, 'modbus', 'tags', 2, 'address') -> devices[0].tags[2].address; a key
    that is not a plain name is quoted in brackets: gateway['my key']."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i == 2 and loc[0] == "devices" and part in DEVICE_PROTOCOLS:
            continue  # the discriminated union's branch name is not a key in the file
        elif _NAME.match(part):
            out = _join(out, part)
        else:
            out += f"[{part!r}]"
    return out or "(top level)"


def parse(text: str, file: str, env: dict[str, str] | None = None) -> Settings:
    """Validate config text; raise ConfigError naming `file` and every bad key path."""
    try:
        raw = yamlload.load(text)
    except (yaml.YAMLError, UnicodeEncodeError) as exc:
        raise ConfigError(file, [_yaml_problem(exc, text)]) from None
    if raw is None:
        raise ConfigError(file, ["the file is empty"])
    if not isinstance(raw, dict):
        raise ConfigError(file, ["the top level must be a mapping (gateway:, outbox:, outputs:, devices:)"])
    missing: list[tuple[Any, ...]] = []
    try:
        expanded = _expand(raw, (), dict(os.environ) if env is None else env, missing)
        if missing:
            problems = [
                f"{_key_path(_in_document(raw, tuple(where)))}: environment variable {name} is not set"
                for *where, name in missing
            ]
            raise ConfigError(file, problems)
        doc = ConfigFile.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(file, [_describe(err) for err in exc.errors()]) from None
    except RecursionError:  # hundreds of levels: YAML allows it, nothing here needs it
        raise ConfigError(file, ["nested too deeply"]) from None
    return _resolve_files(doc, file)


def _yaml_problem(exc: yaml.YAMLError | UnicodeEncodeError, text: str) -> str:
    """`line L, column C: ...` for what the loader refused."""
    if isinstance(exc, UnicodeEncodeError):  # text with a lone surrogate, which libyaml cannot take
        where, problem = _line_column(text, exc.start), "a surrogate code point, which is not UTF-8"
    elif isinstance(exc, yaml.reader.ReaderError):
        # A character YAML does not allow (a control character). Its position is in bytes
        # with libyaml; the character's first occurrence is where the reader stopped.
        ch = exc.character if isinstance(exc.character, str) else chr(exc.character)
        found = text.find(ch)
        where = _line_column(text, found if found >= 0 else exc.position)
        problem = f"the character U+{ord(ch):04X} is not allowed in YAML ({exc.reason})"
    else:
        mark = getattr(exc, "problem_mark", None)
        where = "" if mark is None else f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["?"])[0]
    # Refused: valid YAML (a duplicate key, an alias bomb) that a config may not hold.
    what = "" if isinstance(exc, yamlload.Refused) else "not valid YAML: "
    return f"{where}{what}{problem}"


def _line_column(text: str, position: int) -> str:
    line, start = text.count("\n", 0, position) + 1, text.rfind("\n", 0, position) + 1
    return f"line {line}, column {position - start + 1}: "


# What each file setting must name, for the message when it names a directory.
_FILES = {
    "ca": "the CA certificate file (PEM)",
    "cert": "the client certificate file (PEM)",
    "key": "the client private key file (PEM)",
    "password_file": SECRET_FILE,
}


_DEVICE_KEY = "the file holding the device's key (base64, as the portal shows it)"


def _resolve_files(doc: ConfigFile, file: str) -> Settings:
    """Make relative paths relative to the config file (not to wherever the service
    started), and check now that the files each connection will need are there and load: a
    bad one found at `run` would stop the service with less to go on."""
    base = Path(file).resolve().parent
    problems: list[str] = []
    outbox = doc.outbox.model_copy(update={"path": _outbox_path(base, doc.outbox.path, problems)})
    outputs = tuple(
        _resolve_output(output, _key_path(loc), base, file, problems)
        for loc, output in doc.resolved_outputs()
    )
    devices = [PROTOCOLS[d.protocol].resolve_files(d, i, base, problems) for i, d in enumerate(doc.devices)]
    http = _resolve_http(doc.http, base, problems)
    if problems:
        raise ConfigError(file, problems)
    gateway = doc.gateway
    if gateway.pki_dir is not None:
        gateway = gateway.model_copy(update={"pki_dir": base / gateway.pki_dir})
    return Settings(gateway=gateway, outbox=outbox, http=http, outputs=outputs, devices=devices)


def _resolve_output(
    output: OutputSettings, where: str, base: Path, file: str, problems: list[str]
) -> OutputSettings:
    """The output with its files relative to `base`, and its TLS files loaded (`where`: its
    key path, for the problems)."""
    found: dict[str, Any] = {}
    for key, what in _FILES.items():
        value = getattr(output, key)
        if value is not None:
            found[key] = resolve_file(
                base, value, f"{where}.{key}", what, problems, secret=key == "password_file"
            )
    azure = output.azure
    if azure is not None and azure.device_key_file is not None:
        key_file = resolve_file(
            base, azure.device_key_file, f"{where}.azure.device_key_file", _DEVICE_KEY, problems, secret=True
        )
        found["azure"] = azure.model_copy(update={"device_key_file": key_file})
        if key_file.is_file():
            try:
                read_device_key(key_file)
            except (OSError, UnicodeDecodeError):
                pass  # resolve_file said why
            except ValueError as exc:
                problems.append(f"{where}.azure.device_key_file: {shown(key_file)}: {exc}")
    output = output.model_copy(update=found)
    missing = any(p.startswith((f"{where}.ca:", f"{where}.cert:", f"{where}.key:")) for p in problems)
    if output.tls and (output.ca or output.cert) and not missing:
        try:
            tls.client_context(output, file, where)
        except ConfigError as exc:
            problems += exc.problems
    return output


_HTTP_FILES = {
    "password_file": SECRET_FILE,
    "token_file": SECRET_FILE,
    "cert": "the server certificate file (PEM)",
    "key": "its private key file (PEM)",
}


def _resolve_http(http: HttpSettings, base: Path, problems: list[str]) -> HttpSettings:
    """`http:` with its files relative to `base`: each there, a secret's first line not empty
    (an empty one would let in anybody who sends nothing), and cert and key a PEM pair."""
    found: dict[str, Path] = {}
    for key, what in _HTTP_FILES.items():
        if (value := getattr(http, key)) is None:
            continue
        secret = key.endswith("_file")
        path = found[key] = resolve_file(base, value, f"http.{key}", what, problems, secret=secret)
        if secret:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if path.is_file() and not read_secret(None, path):
                    problems.append(
                        f"http.{key}: the first line of {shown(path)} is empty: put the secret there"
                    )
    if "cert" in found and "key" in found and not problems:
        try:
            # (password="": an encrypted key fails here, rather than ask on the terminal)
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                found["cert"], found["key"], password=""
            )
        except (OSError, ValueError) as exc:
            problems.append(
                f"http.cert: {shown(found['cert'])} and http.key: cannot load them as a PEM pair: {exc}"
            )
    return http.model_copy(update=found) if found else http


def _outbox_path(base: Path, value: Path, problems: list[str]) -> Path:
    """The outbox file relative to the config file; a problem noted if it cannot be one (the
    gateway creates the file and its missing folders, so neither need exist yet)."""
    path = base / home(value)
    if path.is_dir():
        problems.append(
            f"outbox.path: {shown(path)} is a directory; give the database file, "
            f"e.g. {shown(path / 'outbox.db')}"
        )
    else:
        folder = next((p for p in path.parents if p.exists()), None)
        if folder is not None and not folder.is_dir():
            problems.append(f"outbox.path: {shown(path)}: {shown(folder)} is a file, not a directory")
    return path


def _describe(err: Any) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    error = err.get("ctx", {}).get("error")
    if isinstance(error, ProblemAt):  # a check across keys, which names the key it is about
        return f"{_key_path((*err['loc'], *error.loc))}: {msg}"
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see `millwright schema`)"
    elif err["type"] == "missing":
        msg = "required key is missing"
        if tuple(err["loc"]) == ("outputs",):
            msg += f" (or {SHORTHAND}: for a single output)"
    elif err["type"] == "union_tag_invalid":
        protocol = err["input"].get("protocol") if isinstance(err["input"], dict) else None
        msg = f"unknown protocol {reprlib.repr(protocol)}; expected one of {', '.join(DEVICE_PROTOCOLS)}"
    elif err["type"] == "union_tag_not_found":
        msg = f"protocol: is missing; expected one of {', '.join(DEVICE_PROTOCOLS)}"
    elif err["type"] == "invalid_key":
        # The key is the last part of the location; shown as an index it would mislead.
        key = reprlib.repr(err["input"])
        return f"{_key_path(err['loc'][:-1])}: unknown key {key} (a key is a name, such as id)"
    elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        # Not pydantic's "a valid dictionary or instance of GatewaySettings".
        msg = f"expected a mapping (key: value), not {_kind(err['input'])}"
    elif err["type"] == "list_type":
        msg = f"expected a list (- item), not {_kind(err['input'])}"
    elif err["type"] in _TYPE_ERRORS:
        msg = f"{msg}, not {_kind(err['input'])}"
        if err["type"] == "string_type" and isinstance(err["input"], int | float):
            msg += " (quote it to make it text)"
        elif err["type"] != "string_type" and isinstance(err["input"], str):
            # Quoted numbers, and every ${NAME}: substitution always gives text.
            if isinstance(err["input"], EnvText):
                msg += " (from ${NAME}: give the variable digits, or true or false)"
            else:
                msg += " (write numbers and true/false without quotes)"
    elif err["type"] == "string_unicode":
        msg = "not UTF-8 text (a surrogate code point: from an environment variable holding other bytes?)"
    return f"{_key_path(err['loc'])}: {msg}"


_TYPE_ERRORS = ("int_type", "float_type", "bool_type", "string_type")


def _kind(value: Any) -> str:
    """What was given, without the value itself unless it is a boolean or null (the value
    may be a secret, e.g. a password written as a number)."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if value is None:
        return "null (an empty value)"
    kinds = {int: "an integer", float: "a decimal number", str: "text", list: "a list", dict: "a mapping"}
    return next((kind for t, kind in kinds.items() if isinstance(value, t)), f"a {type(value).__name__}")


def load(path: str | Path) -> Settings:
    """Read and validate a config file. Raises ConfigError (the CLI exits 2)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, [f"cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(file, [f"not UTF-8 text (byte {exc.start}): save it as UTF-8"]) from None
    return parse(text, file)


def schema() -> str:
    """The JSON Schema of the config file, as committed in config/schema.json."""
    doc = ConfigFile.model_json_schema(mode="validation")
    del doc["description"]  # the model's docstring, which speaks to the code
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    doc["title"] = "Millwright gateway configuration"
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
