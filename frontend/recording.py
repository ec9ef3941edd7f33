"""Recording the embeds queue (what the visual worker publishes for the LLM worker) and reading it back for
`launch.py replay`. A recording is a msgpack stream: a header {"format": "qvl-recording", "protocol": VERSION},
then one [frames, crc32] pair per Embeds or Cancel message, the CRC over the frames' bytes in order. Reading checks
all of it and names what is wrong: another file, another protocol version, a truncated or corrupted message."""

import os
import zlib

import msgpack
import zmq

from common.messages import Cancel, Embeds, Ping
from common.protocol import VERSION, ProtocolError, decode
from common.security import Curve

FORMAT = "qvl-recording"
MAX_RECORDING_BYTES = 2**34


def _crc(frames: list[bytes]) -> int:
    crc = 0
    for frame in frames:
        crc = zlib.crc32(frame, crc)
    return crc


class Recorder:
    """Subscribes to every visual worker's embeds queue and writes every Embeds and Cancel message (without its topic
    frame) to a file as it goes."""

    def __init__(self, endpoints: list[str], path: str, curve: Curve | None):
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        if curve is not None:
            curve.connect_to(self.sub, "visual")
        for endpoint in endpoints:
            self.sub.connect(endpoint)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.file = open(path, "wb")
        self.file.write(msgpack.packb({"format": FORMAT, "protocol": VERSION}))
        self.live = False  # a ping has arrived: the subscription is in place

    def poll(self) -> None:
        while self.sub.poll(0):
            frames = self.sub.recv_multipart()[1:]  # after the topic frame
            msg = decode(frames)
            self.live = self.live or isinstance(msg, Ping)
            if isinstance(msg, (Embeds, Cancel)):
                self.file.write(msgpack.packb([frames, _crc(frames)]))
                self.file.flush()

    def close(self) -> None:
        self.poll()
        self.file.close()
        self.sub.close(linger=0)


def read_recording(path: str) -> list[list[bytes]]:
    """The recorded messages' frames, each checked; a ValueError says what is wrong with the file."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, max_buffer_size=MAX_RECORDING_BYTES, raw=False)
        try:
            header = next(unpacker)
        except StopIteration:
            raise ValueError(f"{path} is empty: not a recording") from None
        except (msgpack.UnpackException, ValueError):
            raise ValueError(f"{path} is not a recording (no {FORMAT} header)") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a recording (no {FORMAT} header)")
        if header.get("protocol") != VERSION:
            raise ValueError(f"{path} was recorded with protocol version {header.get('protocol')!r}; this build "
                             f"replays version {VERSION}")
        messages = []
        try:
            for record in unpacker:
                n = len(messages) + 1
                if not (isinstance(record, list) and len(record) == 2 and isinstance(record[0], list)
                        and all(isinstance(x, bytes) for x in record[0]) and isinstance(record[1], int)):
                    raise ValueError(f"{path}: message {n} is not [frames, crc32]")
                frames, crc = record
                if _crc(frames) != crc:
                    raise ValueError(f"{path}: message {n} is corrupted (checksum mismatch)")
                try:
                    msg = decode(frames)
                except ProtocolError as e:
                    raise ValueError(f"{path}: message {n} breaks the protocol: {e}") from None
                if not isinstance(msg, (Embeds, Cancel)):
                    raise ValueError(f"{path}: message {n} is a {type(msg).__name__}; recordings hold embeds and "
                                     "cancel messages")
                messages.append(frames)
        except (msgpack.UnpackException, ValueError) as e:
            if str(e).startswith(path):
                raise
            raise ValueError(f"{path} is truncated or corrupted after {len(messages)} messages") from None
        if unpacker.tell() != os.fstat(f.fileno()).st_size:
            raise ValueError(f"{path} is truncated after {len(messages)} messages")
    if not messages:
        raise ValueError(f"{path} holds no messages")
    return messages
