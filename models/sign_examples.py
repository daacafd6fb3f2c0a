"""Sign every example model version with the demo key, then verify it.

A version directory is ``<repo>/<model>/<version>/`` with a numeric version, as
in Triton's layout. Each gets an ``identity.json`` naming ``<model>/<version>``
and a fresh ``model.sig`` (both written atomically) from the demo key in
``keys/``, and is then verified against ``keys/trusted/`` as the agent verifies
it: the signed identity must be the directory's place in the repository.

    .venv/bin/python models/sign_examples.py            # sign and verify models/
    .venv/bin/python models/sign_examples.py --check    # verify only (exit 1 on failure)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(HERE.parent))

from agent.errors import AgentError  # noqa: E402
from agent.signing import keys  # noqa: E402
from agent.signing.identity import identity_of_path  # noqa: E402
from agent.signing.version_dir import sign_version, verify_version  # noqa: E402


def version_dirs(repo: Path) -> list[Path]:
    found = []
    for model in sorted(repo.iterdir()):
        if not model.is_dir() or model.is_symlink() or model.name.startswith((".", "keys")):
            continue
        for version in sorted(model.iterdir()):
            if version.is_dir() and not version.is_symlink() and version.name.isdigit():
                found.append(version)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=HERE, help="model repository (models/)")
    parser.add_argument("--key", type=Path, default=HERE / "keys" / "demo-model-signing.key.pem")
    parser.add_argument("--trust-dir", type=Path, default=HERE / "keys" / "trusted")
    parser.add_argument("--check", action="store_true", help="only verify, do not sign")
    args = parser.parse_args()

    versions = version_dirs(args.repo)
    if not versions:
        print(f"no <model>/<version>/ directories under {args.repo}", file=sys.stderr)
        return 1
    failed = 0
    try:
        trust = keys.TrustStore.from_directory(args.trust_dir)
        private_key = None if args.check else keys.load_private_key(args.key)
    except AgentError as error:
        print(f"FAILED {error.code}: {error}", file=sys.stderr)
        return 1
    for version in versions:
        name = version.relative_to(args.repo)
        try:
            place = identity_of_path(version)
            if private_key is not None:
                sign_version(version, private_key, model_name=place.model, version=place.version)
            verified = verify_version(version, trust, identity=place)
        except AgentError as error:
            failed += 1
            print(f"{name}: FAILED {error.code}: {error}", file=sys.stderr)
            continue
        action = "verified" if args.check else "signed and verified"
        print(
            f"{name}: {action} as {place}, {len(verified.manifest)} files, "
            f"key {verified.key_id[:16]}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
