"""`python -m sweeps.report root=DIR [group_by=KEY[,KEY...]] [bootstrap=N] [reference=GROUP]
[exclude_sweeps=NAME[,NAME...]] [figures=true|false] [seed=N]`: re-fit and re-draw everything in DIR's
results database without training (see sweeps.analysis.report for what the report holds).

This module only parses the command line into a ``ReportConfig``; ``make_report`` keeps the keyword form the
sweep calls at the end of a sweep.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from archs.errors import ConfigError
from sweeps.analysis import report as analysis

USAGE = ("usage: python -m sweeps.report root=DIR [group_by=KEY[,KEY...]] [bootstrap=N] [reference=GROUP] "
         "[exclude_sweeps=NAME[,NAME...]] [figures=true|false] [seed=N]")


def parse_list(value: Any) -> list[str]:
    """'arch', 'arch,arch.pattern', '[arch,pattern]' or a list -> list of keys."""
    if isinstance(value, str):
        value = [k.strip().strip("'\"") for k in value.strip().strip("[]").split(",")]
    return [str(k) for k in value if str(k)]


def make_report(root: str | Path, *, group_by: Iterable[str] = ("arch",), n_boot: int = 1000, reference: str = "",
                exclude_sweeps: Iterable[str] = ("lr_scan",), seed: int = 0, figures: bool = True) -> Path:
    return analysis.make_report(analysis.ReportConfig(
        root=str(root), group_by=parse_list(group_by) or ["arch"], bootstrap=n_boot, reference=reference or "",
        exclude_sweeps=list(exclude_sweeps), seed=seed, figures=figures))


def parse_args(argv: Sequence[str]) -> analysis.ReportConfig:
    known = {"root", "group_by", "bootstrap", "reference", "exclude_sweeps", "figures", "seed"}
    args: dict[str, str] = {}
    for a in argv:
        a = a.lstrip("+")
        if "=" not in a:
            raise ConfigError(f"argument {a!r} is not key=value; {USAGE}")
        k, v = a.split("=", 1)
        k = {"sweep.group_by": "group_by", "sweep.bootstrap": "bootstrap", "n_boot": "bootstrap"}.get(k, k)
        if k not in known:
            raise ConfigError(f"unknown argument {k!r}; known: {', '.join(sorted(known))}")
        args[k] = v
    if "root" not in args:
        raise ConfigError(f"root=DIR is required; {USAGE}")
    try:
        n_boot = int(float(args.get("bootstrap", 1000)))
        seed = int(args.get("seed", 0))
    except ValueError:
        raise ConfigError(f"bootstrap and seed must be integers; {USAGE}") from None
    excl = args.get("exclude_sweeps")
    return analysis.ReportConfig(
        root=args["root"], group_by=parse_list(args.get("group_by", "arch")) or ["arch"], bootstrap=n_boot, seed=seed,
        reference=args.get("reference", ""),
        exclude_sweeps=["lr_scan"] if excl is None else [s for s in parse_list(excl) if s != "none"],
        figures=args.get("figures", "true").lower() not in ("false", "0", "no"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + analysis.__doc__)
        return 0
    try:
        return analysis.main(parse_args(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
