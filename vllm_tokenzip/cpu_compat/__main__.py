"""``python -m vllm_tokenzip.cpu_compat install|check``: apply or check the CPU-stack fixes."""

from __future__ import annotations

import sys

from vllm_tokenzip.cpu_compat import (
    check,
    install_torchvision_hook,
    install_vllm_metadata_alias,
    site_packages,
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["install"], ["check"]):
        print("usage: python -m vllm_tokenzip.cpu_compat install|check", file=sys.stderr)
        return 2
    if args == ["install"]:
        target = site_packages()
        alias = install_vllm_metadata_alias(target)
        print(f"vllm metadata alias: {alias or 'not needed'}")
        hooked = install_torchvision_hook(target)
        print(f"torchvision op-schema hook: {'installed' if hooked else 'not needed'}")
    problems = check()
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    return 1 if problems else 0


sys.exit(main())
