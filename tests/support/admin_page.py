"""A browser's part in the admin page's HTTP tests: cookies kept as a browser keeps them, the
hidden fields of the last page read, and forms posted with them. Plain aiohttp over loopback."""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any

import aiohttp

HIDDEN = re.compile(r'<input type="hidden" name="(csrf|nonce)" value="([^"]*)"')


@dataclass
class Page:
    status: int
    text: str
    headers: Any
    set_cookies: list[str]

    def field(self, name: str) -> str:
        for found, value in HIDDEN.findall(self.text):
            if found == name:
                return html.unescape(value)
        raise AssertionError(f"no hidden {name} field on the page")

    @property
    def json_error(self) -> dict[str, Any]:
        """The OpenAI-shaped error of a refusal."""
        error: dict[str, Any] = json.loads(self.text)["error"]
        return error


@dataclass
class PageClient:
    http: aiohttp.ClientSession
    url: str
    cookies: dict[str, str] = field(default_factory=dict)

    async def get(self, path: str, **headers: str) -> Page:
        return await self._send("GET", path, None, headers)

    async def post(self, path: str, form: dict[str, str], **headers: str) -> Page:
        return await self._send("POST", path, form, headers)

    async def log_in(self, token: str) -> Page:
        form = await self.get("/admin/login")
        return await self.post("/admin/login", {"token": token, "nonce": form.field("nonce")})

    async def _send(self, method: str, path: str, form: dict[str, str] | None,
                    headers: dict[str, str]) -> Page:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        async with self.http.request(method, self.url + path, data=form, headers=sent,
                                     allow_redirects=False) as response:
            text = await response.text()
            set_cookies = response.headers.getall("Set-Cookie", [])
            for line in set_cookies:
                for name, morsel in SimpleCookie(line).items():
                    if morsel.value and morsel["max-age"] != "0":
                        self.cookies[name] = morsel.value
                    else:
                        self.cookies.pop(name, None)
            return Page(response.status, text, response.headers, set_cookies)
