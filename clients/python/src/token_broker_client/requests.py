"""`requests` auth with the broker as token source: `session.auth = BrokerRequestsAuth("twilio")`.

Every request carries `Authorization: Bearer <token>`; on a 401 the broker's refresh route is
asked once and the request sent once more with the new token. Needs the `requests` extra.
"""

from __future__ import annotations

from typing import Any

import requests
from requests.auth import AuthBase
from requests.cookies import extract_cookies_to_jar

from token_broker_client.errors import RateLimited
from token_broker_client.source import TokenSource


class BrokerRequestsAuth(AuthBase):
    """Attach the app's token; on a 401, one refresh at the broker and one retry.

    `source` is a TokenSource or an app name (then `options` are TokenSource's). The retry is
    skipped when the broker hands back the rejected token, refuses the refresh as rate-limited,
    or the body was a stream that cannot be rewound: the caller then sees the upstream's 401.
    """

    def __init__(self, source: TokenSource | str, **options: Any) -> None:
        self.source = source if isinstance(source, TokenSource) else TokenSource(source, **options)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        """Attach the token and the hook that retries once after a 401."""
        request.headers["Authorization"] = f"Bearer {self.source.get_token()}"
        request.register_hook("response", self._retry_after_401)  # type: ignore[no-untyped-call]
        return request

    def _retry_after_401(self, response: requests.Response, **send: Any) -> requests.Response:
        request = response.request
        if response.status_code != 401 or not _replayable(request):
            return response
        sent = str(request.headers.get("Authorization", ""))
        rejected = sent.removeprefix("Bearer ")
        try:
            new = self.source.refresh(rejected=rejected).access_token
        except RateLimited:
            return response
        if new == rejected:
            return response
        # As requests' own HTTPDigestAuth retries: drain and release the first answer, carry
        # its cookies over, and send the copy through the same adapter (no hooks run there, so
        # the retry is never retried again).
        _ = response.content
        response.close()
        retry = request.copy()
        extract_cookies_to_jar(retry._cookies, request, response.raw)  # type: ignore[attr-defined, no-untyped-call]
        retry.prepare_cookies(retry._cookies)  # type: ignore[attr-defined]
        retry.headers["Authorization"] = f"Bearer {new}"
        position = getattr(request, "_body_position", None)
        if hasattr(retry.body, "seek") and position is not None:
            retry.body.seek(position)  # type: ignore[union-attr]
        answer: requests.Response = response.connection.send(retry, **send)
        answer.history.append(response)
        answer.request = retry
        return answer


def _replayable(request: requests.PreparedRequest) -> bool:
    """A body of bytes or text (or none) can be sent twice; a stream only if it can seek back."""
    body = request.body
    if body is None or isinstance(body, bytes | str):
        return True
    return hasattr(body, "seek") and getattr(request, "_body_position", None) is not None
