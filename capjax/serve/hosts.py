"""Which Host headers the server answers: the defence against DNS rebinding (`HostCheck`).

A web page elsewhere can point a name of its own at 127.0.0.1 (DNS rebinding) and then talk to a server
bound to loopback as if it were its own site: the browser lets the page read the answers, because the
page and the server share that name. What gives it away is the Host header, which carries the page's
name. So a server bound to loopback answers only requests whose Host names a loopback address
(localhost, 127.x.y.z or [::1], with any port) or one of --allowed_hosts; a server bound to another
address (--host=0.0.0.0) checks the Host header only when --allowed_hosts is given.
"""

from collections.abc import Iterable
import ipaddress

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.websockets import WebSocketClose

from capjax import errors

# 421 Misdirected Request (RFC 9110 15.5.20): "this server is not able or willing to answer for that
# host name", which is the case; 400 would call the request malformed, and it is not.
STATUS = 421
ANY = '*'


def is_loopback(host: str) -> bool:
  """Whether `host` (a name or an address, IPv6 without brackets) is this machine's loopback."""
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:  # a host name: it may resolve to anything
    return False


def host_name(value: str) -> str | None:
  """The host of a Host header value (or of an --allowed_hosts entry), lower-case, without the port or
  a final dot (an IPv6 address: without brackets, in its short form); None when it is not host[:port]."""
  value = value.strip().lower()
  if value.startswith('['):  # [IPv6]:port
    address, bracket, port = value[1:].partition(']')
    if not bracket or (port and not (port[0] == ':' and port[1:].isdigit())):
      return None
    return _ipv6(address)
  host, colon, port = value.partition(':')
  if colon and not port.isdigit():  # several colons (IPv6 without brackets) or a bad port
    return None
  host = host.removesuffix('.')
  if not host or any(c in host for c in '/@\\ \t[]'):
    return None
  return host


def allowed_names(names: Iterable[str]) -> frozenset[str]:
  """--allowed_hosts as host names (ports are ignored); '*' allows any. InputError for an entry that
  is not a host name."""
  allowed = set()
  for name in names:
    name = name.strip()
    if not name:
      continue
    host = ANY if name == ANY else _ipv6(name) or host_name(name)  # an IPv6 address may lack brackets
    if host is None:
      raise errors.InputError(f'--allowed_hosts: {name!r} is not a host name (e.g. captions.example.org, '
                              '192.168.1.20 or [fd00::1]; a port is ignored)')
    allowed.add(host)
  return frozenset(allowed)


def _ipv6(name: str) -> str | None:
  """An IPv6 address in its short form (the one way to write it), or None."""
  try:
    return str(ipaddress.IPv6Address(name))
  except ValueError:
    return None


class HostCheck:
  """ASGI middleware: a request whose Host header is not a loopback name or one of `allowed` gets a
  JSON 421 (a WebSocket is closed) and never reaches the app. Lifespan messages pass through."""

  def __init__(self, app, allowed: frozenset[str]):
    self.app, self.allowed = app, allowed

  def accepts(self, value: str | None) -> bool:
    if ANY in self.allowed:
      return True
    host = host_name(value) if value else None
    return host is not None and (is_loopback(host) or host in self.allowed)

  async def __call__(self, scope, receive, send) -> None:
    if scope['type'] not in ('http', 'websocket'):
      await self.app(scope, receive, send)
      return
    value = Headers(scope=scope).get('host')
    if self.accepts(value):
      await self.app(scope, receive, send)
      return
    if scope['type'] == 'websocket':
      await WebSocketClose()(scope, receive, send)
      return
    shown = 'no Host header' if value is None else f'the Host {value[:200]!r}'
    names = ['localhost', '127.0.0.1', '[::1]', *sorted(self.allowed)]
    example = host_name(value or '') or 'NAME'
    response = JSONResponse({'error': (
        f'{shown} is not served here: this server answers for {", ".join(names[:-1])} and {names[-1]} '
        f'(a guard against DNS rebinding). If you reach it under that name on purpose, start it with '
        f'--allowed_hosts={example}')}, status_code=STATUS)
    await response(scope, receive, send)
