"""`python -m vmm.images`: prebuild the default image and its ext4 base, and print where they are
(what `boxlite setup` does first, without its other steps)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vmm.errors import ConfigError, ImageError
from vmm.home import default_home
from vmm.images import resolve_image
from vmm.images.default import ensure_default_image
from vmm.log import enable_from_env


def main(argv: list[str] | None = None) -> int:
    """Prebuild the default image (and its ext4 base) and print where they are."""
    parser = argparse.ArgumentParser(prog="python -m vmm.images", description=main.__doc__)
    parser.add_argument("--home", type=Path, default=None,
                        help="runtime home (default: $BOXLITE_HOME, $XDG_CACHE_HOME/pytest-boxlite, "
                             "~/.cache/pytest-boxlite)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    ns = parser.parse_args(argv)
    home = (ns.home or default_home()).expanduser().resolve()

    def show(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if not enable_from_env():
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        image = resolve_image("default", home, progress=None if ns.quiet else show)
    except (ConfigError, ImageError) as e:  # a bad $BOXLITE_LOG, or an image that cannot be built
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"rootfs: {ensure_default_image(home).rootfs}")
    print(f"base:   {image.base}")
    print(f"digest: {image.digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
