"""A pod's view of IMDS through the real Azure SDK (azure-identity, pinned by `cargo xtask setup`).

Usage: imds_client.py managed [CLIENT_ID] | default
Prints one JSON object: {"result": "token", "token": ..., "seconds": ...} or
{"result": "<exception class>", "message": ..., "seconds": ...}.
"""
import json
import sys
import time

from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

SCOPE = "https://vault.azure.net/.default"


def main() -> None:
    mode = sys.argv[1]
    started = time.monotonic()
    if mode == "managed":
        client_id = sys.argv[2] if len(sys.argv) > 2 else None
        credential = ManagedIdentityCredential(client_id=client_id)
    elif mode == "default":
        # The chain as applications use it; tools absent from a pod are left out so a
        # failure cannot hide behind them.
        credential = DefaultAzureCredential(
            exclude_cli_credential=True,
            exclude_powershell_credential=True,
            exclude_developer_cli_credential=True,
            exclude_shared_token_cache_credential=True,
            exclude_visual_studio_code_credential=True,
        )
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    try:
        token = credential.get_token(SCOPE)
        out = {"result": "token", "token": token.token}
    except Exception as error:  # the class is the result
        out = {"result": type(error).__name__, "message": str(error)}
    out["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
