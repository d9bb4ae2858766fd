"""Template mining with drain3: learn templates on normal data, match without learning.

drain3 does the mining (we do not write a miner). This module adds what the product
needs around it: a typed, user-visible configuration (masking rules and thresholds,
with named per-system presets in ``parsers.toml``), a strict split between learning
(:meth:`TemplateMiner.learn`) and pure matching (:meth:`TemplateMiner.match`), and a
JSON state that never goes through pickle/jsonpickle.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from drain3 import TemplateMiner as _Drain3Miner
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig

PRESETS_FILE = Path(__file__).with_name("parsers.toml")

# Generic masks, applied in order (earlier, more specific classes first, so an IP is
# not eaten as numbers and a timestamp not as a ratio). Each one is a class of
# variable an operator would recognise in any log; system-specific rules belong in
# ``parsers.toml``. The look-arounds keep a mask from eating part of a word:
# ``abc123``, ``wl0`` and ``ssh2`` stay literal, while ``core.42``, ``rdd_2_0`` and
# ``job-7`` expose their numbers (``.``, ``_`` and ``-`` separate, letters do not).
_B = r"(?<![A-Za-z0-9])"
_E = r"(?![A-Za-z0-9])"
_HEX4 = r"[0-9a-fA-F]{1,4}"
_IPV4 = r"\d{1,3}(?:\.\d{1,3}){3}"
_SIZE = r"\d+(?:\.\d+)?\s?(?:[KMGTP]i?B|[KMGTP]?bytes?|B)"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
DEFAULT_MASKS: tuple[tuple[str, str], ...] = (
    # scheme://anything up to whitespace or a quote
    (r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>]+", "URL"),
    # HDFS-style block ids, masked whole (sign included)
    (r"blk_-?\d+", "BLK"),
    (_B + r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}" + _E, "UUID"),
    (_B + r"(?:[0-9a-fA-F]{2}[:\-]){5}[0-9a-fA-F]{2}" + _E, "MAC"),
    # Network endpoints are all <HOST>: the same field (rhost=, "from X", a proxy
    # target) prints a name one time and an address the next.
    # IPv4 with optional leading slash and :port, or a comma-separated list of them
    (r"(?<![A-Za-z0-9.])/?" + _IPV4 + r"(?::\d{1,5})?(?:,\s?" + _IPV4 + r"(?::\d{1,5})?)*" + _E, "HOST"),
    # IPv6: eight groups, or a compressed form with "::"
    (_B + r"(?:(?:" + _HEX4 + r":){7}" + _HEX4 + r"|(?:" + _HEX4 + r":){1,6}:(?:" + _HEX4 + r":){0,5}" + _HEX4 + r")"
     + r"(?![0-9a-fA-F:])", "HOST"),
    # host names: three or more labels (a.b.com), or two with a :port (github.com:443);
    # labels have no "_" so Java/Android constants like a.b.ACTION_X are left alone
    (r"(?<![\w.\-/])(?:(?:" + _LABEL + r"\.){2,}[A-Za-z][A-Za-z0-9\-]*(?::\d{1,5})?"
     + r"|(?:" + _LABEL + r"\.)+[A-Za-z][A-Za-z0-9\-]*:\d{1,5})(?![\w\-]|\.\w)", "HOST"),
    (_B + r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?)?" + _E, "DATE"),
    # ctime/syslog style: "Fri Jul  1 07:57:30 2005", "Jun 17 07:07:00"
    (r"\b(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)\s+)?(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)\s+\d{1,2}"
     + r"\s+\d{1,2}:\d{2}:\d{2}(?:\s+\d{4})?" + _E, "DATE"),
    (_B + r"\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?" + _E, "TIME"),
    # Unix or Windows paths with at least one separator after the first segment
    (r"(?<![\w/.\-])(?:[A-Za-z]:)?(?:[/\\][\w.\-@~+%$]+)+[/\\]?", "PATH"),
    (_B + r"0[xX][0-9a-fA-F]+" + _E, "HEX"),
    # sizes with units, the unit varying with the value (384.0 B / 2.1 KB), and an
    # optional human-readable echo in parentheses: "1190 bytes (1.16 KB)"
    (_B + _SIZE + r"(?:\s\(" + _SIZE + r"\))?" + _E, "SIZE"),
    # durations glued to their unit (12ms, 1.5s) or bounded ("<1 sec"); in "30 seconds"
    # only the number varies, so that stays <NUM> seconds
    (r"(?<![A-Za-z0-9<>])(?:[<>]\d+(?:\.\d+)?\s?|\d+(?:\.\d+)?)(?:ns|us|ms|s|secs?|seconds?|mins?|minutes?|h|hours?)"
     + _E, "DURATION"),
    # bare hex words of 8+ digits (addresses, hashes, ids) are numbers too: the same
    # field prints 00106210 one time and 0244c1dc the next
    (_B + r"(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,}" + _E, "NUM"),
    # the value of key=value (quoted values may contain spaces); empty values stay empty
    (r"(?<=[A-Za-z0-9_]=)(?:\"[^\"]*\"|'[^']*'|[^\s,;&=\"'()\[\]{}]+)", "VALUE"),
    (_B + r"(?:true|false|True|False|TRUE|FALSE)" + _E, "BOOL"),
    # decimal numbers, with sign and dotted parts (versions, 1.2.3)
    (_B + r"[-+]?\d+(?:\.\d+)*" + _E, "NUM"),
)


@dataclass(frozen=True)
class ParserConfig:
    """Every drain3 setting we expose, with the defaults of one generic configuration.

    Attributes:
        sim_th: Similarity a line needs to join an existing cluster while learning.
        depth: Depth of drain's prefix tree (>= 3).
        max_children: Fan-out limit per tree node.
        max_clusters: Cap on clusters (LRU eviction), ``None`` for unlimited.
        extra_delimiters: Characters split like spaces (e.g. ``"="``, ``","``).
        masks: Ordered ``(regex, name)`` pairs; a match becomes ``<name>``.
        parametrize_numeric_tokens: Treat tokens with digits as parameters in the tree.
    """

    sim_th: float = 0.75
    depth: int = 5
    max_children: int = 100
    max_clusters: int | None = None
    extra_delimiters: tuple[str, ...] = ()
    masks: tuple[tuple[str, str], ...] = DEFAULT_MASKS
    parametrize_numeric_tokens: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.sim_th <= 1.0:
            raise ValueError(f"sim_th must be in (0, 1], got {self.sim_th!r}")
        if self.depth < 3:
            raise ValueError(f"depth must be >= 3, got {self.depth!r}")
        for pattern, name in self.masks:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"mask {name!r}: bad regex {pattern!r}: {exc}") from exc

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ParserConfig":
        """Build from a TOML/JSON mapping; unknown keys are an error, not ignored."""
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown parser setting(s) {sorted(unknown)}; known: {sorted(known)}")
        values = dict(raw)
        if "masks" in values:
            masks = []
            for item in values["masks"]:
                if isinstance(item, dict):
                    masks.append((str(item["pattern"]), str(item["name"])))
                else:
                    pattern, name = item
                    masks.append((str(pattern), str(name)))
            values["masks"] = tuple(masks)
        if "extra_delimiters" in values:
            values["extra_delimiters"] = tuple(values["extra_delimiters"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping (masks as ``{"pattern", "name"}`` objects)."""
        data = asdict(self)
        data["masks"] = [{"pattern": p, "name": n} for p, n in self.masks]
        data["extra_delimiters"] = list(self.extra_delimiters)
        return data


@lru_cache(maxsize=1)
def _preset_table(path: Path = PRESETS_FILE) -> dict[str, dict[str, Any]]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def preset_names() -> list[str]:
    """Names of the parser presets shipped in ``parsers.toml``."""
    return sorted(_preset_table())


def load_preset(name: str) -> ParserConfig:
    """Return the named preset from ``parsers.toml``.

    A preset may set ``inherit_default_masks = true`` to put its own masks before
    the generic ones instead of replacing them.

    Raises:
        ValueError: If ``name`` is not a known preset.
    """
    table = _preset_table()
    if name not in table:
        raise ValueError(f"unknown parser preset {name!r}; known: {sorted(table)}")
    raw = dict(table[name])
    inherit = bool(raw.pop("inherit_default_masks", False))
    config = ParserConfig.from_dict(raw)
    if inherit:
        config = replace(config, masks=config.masks + DEFAULT_MASKS)
    return config


@dataclass
class TemplateMiner:
    """drain3 behind a learn/match split.

    ``learn`` grows and refines clusters (fit time only). ``match`` is pure: it
    never creates or changes a cluster, and returns ``None`` for a line whose
    template was never seen, which detectors treat as an unseen template.
    """

    config: ParserConfig = field(default_factory=ParserConfig)

    def __post_init__(self) -> None:
        cfg = TemplateMinerConfig()
        cfg.drain_sim_th = self.config.sim_th
        cfg.drain_depth = self.config.depth
        cfg.drain_max_children = self.config.max_children
        cfg.drain_max_clusters = self.config.max_clusters
        cfg.drain_extra_delimiters = list(self.config.extra_delimiters)
        cfg.parametrize_numeric_tokens = self.config.parametrize_numeric_tokens
        cfg.masking_instructions = [MaskingInstruction(p, n) for p, n in self.config.masks]
        cfg.profiling_enabled = False
        self._miner = _Drain3Miner(persistence_handler=None, config=cfg)
        self._match_cache: dict[str, int | None] = {}
        # The same substitutions drain3's masker makes, in a tight loop: masking is
        # most of the cost of matching, and drain3 rebuilds the mask string per call.
        self._subs = [(re.compile(p), f"<{n}>") for p, n in self.config.masks]

    def learn(self, content: str) -> int:
        """Add one message to the model; returns its cluster id (1-based)."""
        self._match_cache.clear()
        result = self._miner.add_log_message(content)
        return int(result["cluster_id"])

    def match(self, content: str) -> int | None:
        """Cluster id of ``content`` under the learned templates, or ``None``; learns nothing."""
        masked = content
        for regex, repl in self._subs:
            masked = regex.sub(repl, masked)
        cached = self._match_cache.get(masked, -1)
        if cached != -1:
            return cached  # type: ignore[return-value]
        cluster = self._miner.drain.match(masked, full_search_strategy="fallback")
        cid = None if cluster is None else int(cluster.cluster_id)
        if len(self._match_cache) < 200_000:
            self._match_cache[masked] = cid
        return cid

    def mask(self, content: str) -> str:
        """The message with masks applied, as drain3 sees it."""
        for regex, repl in self._subs:
            content = regex.sub(repl, content)
        return content

    def template(self, cluster_id: int) -> str:
        """Current template text of a cluster."""
        cluster = self._miner.drain.id_to_cluster.get(cluster_id)
        if cluster is None:
            raise KeyError(f"unknown template id {cluster_id!r}")
        return cluster.get_template()

    def templates(self) -> dict[int, str]:
        """All learned templates by cluster id."""
        return {int(c.cluster_id): c.get_template() for c in self._miner.drain.clusters}

    def parameters(self, cluster_id: int, content: str) -> list[str]:
        """Values of the template's variable parts in ``content`` (may be empty)."""
        params = self._miner.extract_parameters(self.template(cluster_id), content, exact_matching=False)
        return [p.value for p in params or []]
