"""Report requirements missing from a wheelhouse for a given target Python.

`pip wheel` resolves environment markers against the *host* interpreter, but the
images run a different patch release (Debian bookworm ships 3.11.2, so e.g.
redis needs `async-timeout; python_full_version < "3.11.3"` there while the host's
3.11.7 does not). This walks the Requires-Dist of every wheel in the wheelhouse,
evaluates the markers for the target interpreter and prints (one per line) each
requirement that no wheel in the wheelhouse satisfies. build-images.sh feeds them
back to `pip wheel` until nothing is missing.

usage: python wheelhouse-closure.py WHEELHOUSE TARGET_PYTHON_VERSION (e.g. 3.11.2)
"""

from __future__ import annotations

import email.parser
import sys
import zipfile
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip always vendors packaging
    from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import (  # type: ignore[no-redef]
        canonicalize_name,
        parse_wheel_filename,
    )


def main() -> int:
    wheelhouse, target = Path(sys.argv[1]), sys.argv[2]
    env = dict(default_environment())
    env.update(
        python_full_version=target,
        python_version=".".join(target.split(".")[:2]),
        implementation_version=target,
    )
    have: dict[str, list[str]] = {}
    requires: dict[str, list[Requirement]] = {}
    for whl in sorted(wheelhouse.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(whl.name)
        key = canonicalize_name(name)
        have.setdefault(key, []).append(str(version))
        with zipfile.ZipFile(whl) as zf:
            meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
        requires[key] = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]

    # Which extras of each project are requested (the root project: none).
    wanted_extras: dict[str, set[str]] = {k: {""} for k in requires}
    changed = True
    while changed:
        changed = False
        for key, reqs in requires.items():
            for req in reqs:
                if not any(
                    req.marker is None or req.marker.evaluate({**env, "extra": extra})
                    for extra in wanted_extras.get(key, {""})
                ):
                    continue
                dep = canonicalize_name(req.name)
                extras = wanted_extras.setdefault(dep, {""})
                if not set(req.extras) <= extras:
                    extras.update(req.extras)
                    changed = True

    missing: set[str] = set()
    for key, reqs in requires.items():
        for req in reqs:
            active = any(
                req.marker is None or req.marker.evaluate({**env, "extra": extra})
                for extra in wanted_extras.get(key, {""})
            )
            if not active:
                continue
            dep = canonicalize_name(req.name)
            if not any(req.specifier.contains(v, prereleases=True) for v in have.get(dep, [])):
                extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
                missing.add(f"{req.name}{extras}{req.specifier}")
    for req_str in sorted(missing):
        print(req_str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
