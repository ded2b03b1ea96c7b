"""moto's standalone server (`python -m moto.server`), with one fix for signed requests.

werkzeug's `Request.url` re-encodes the query string (`prefix=a%2Fb` becomes `prefix=a/b`), and
moto checks a request's SigV4 signature against that URL; botocore signed the query as sent, so
with authentication on, every request whose query holds a `/` (ListObjectsV2 with a prefix
`a/b`, which the runtime sends) fails with SignatureDoesNotMatch, where real S3 accepts it.
Here the URL keeps the query string exactly as received. Started by support.MotoServer.
"""

import sys

from werkzeug.wrappers import Request


def _url_as_sent(self: Request) -> str:
    query = self.environ.get("QUERY_STRING", "")
    return self.base_url + (f"?{query}" if query else "")


Request.url = property(_url_as_sent)  # type: ignore[assignment]

if __name__ == "__main__":
    from moto.server import main

    sys.exit(main())
