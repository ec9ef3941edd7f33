"""ZeroMQ CURVE for the sockets between the processes, for endpoints that leave the host: `launch.py keys DIR` writes
one keypair a role (frontend, visual, llm). A binding socket is a CURVE server that admits only the public keys in
DIR (ZAP), a connecting socket a client that knows its binder's public key; traffic is encrypted, and a process
without a key of DIR cannot connect at all. Each frame that arrives carries its sender's public key, so the front end
takes a request's results only from the role that sends them (`sender`)."""

import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

ROLES = ("frontend", "visual", "llm")


def write_keys(folder) -> list[Path]:
    """A keypair for each role in `folder` (made 0700; secret files 0600); → the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    written = []
    for role in ROLES:
        public, secret = zmq.auth.create_certificates(folder, role)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    return written


class Curve:
    """One process's CURVE identity: its role's keypair and every role's public key, from the keys folder."""

    _authenticators: dict[int, ThreadAuthenticator] = {}  # one ZAP handler a context

    def __init__(self, folder, role: str):
        self.folder = Path(folder)
        missing = [f"{r}.key" for r in ROLES if not (self.folder / f"{r}.key").is_file()]
        if missing or not (self.folder / f"{role}.key_secret").is_file():
            raise FileNotFoundError(f"{self.folder}: not a keys folder with {role}.key_secret and "
                                    f"{', '.join(f'{r}.key' for r in ROLES)} (make one with `launch.py keys DIR`)")
        self.role = role
        self.public, self.secret = zmq.auth.load_certificate(self.folder / f"{role}.key_secret")
        self.publics = {r: zmq.auth.load_certificate(self.folder / f"{r}.key")[0] for r in ROLES}
        self.roles = {key.decode(): r for r, key in self.publics.items()}

    def serve(self, socket: zmq.Socket) -> None:
        """Makes a socket about to bind a CURVE server that admits the folder's public keys only."""
        ctx = socket.context
        if id(ctx) not in self._authenticators:
            auth = ThreadAuthenticator(ctx)
            auth.start()
            auth.configure_curve(domain="*", location=str(self.folder))
            self._authenticators[id(ctx)] = auth
        socket.curve_secretkey, socket.curve_publickey = self.secret, self.public
        socket.curve_server = True

    def connect_to(self, socket: zmq.Socket, server_role: str) -> None:
        """Makes a socket about to connect a CURVE client of the socket `server_role` binds."""
        socket.curve_secretkey, socket.curve_publickey = self.secret, self.public
        socket.curve_serverkey = self.publics[server_role]

    def sender(self, frame: zmq.Frame) -> str | None:
        """The role whose key sent a received frame (read with copy=False); None when it is none of them."""
        return self.roles.get(frame.get("User-Id"))


def curve(folder, role: str) -> Curve | None:
    """The process's CURVE identity, or None when no keys folder is given (ipc within one host)."""
    return None if folder is None else Curve(folder, role)
