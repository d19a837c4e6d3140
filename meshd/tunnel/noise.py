"""Noise_IK_25519_ChaChaPoly_BLAKE2s (The Noise Protocol Framework, revision 34): the handshake.

Written from the specification (§4 crypto functions, §5 processing rules, §7.5 the IK pattern,
§12 ChaChaPoly / BLAKE2s) over `cryptography` (X25519, ChaCha20-Poly1305) and `hashlib.blake2s`:

    IK:
      <- s
      ...
      -> e, es, s, ss
      <- e, ee, se

The initiator knows the responder's static key beforehand (from the mesh registry); the responder
learns the initiator's static key from message 1. Both messages carry a payload (the handshake
payload of `meshd.tunnel.wire`: certificate and signature). `split()` gives the two transport
keys. Any message that does not decrypt, or carries a bad public key, raises `NoiseError`
(a remote error: drop the message); nothing else is raised for peer bytes.

Checked against the published test vectors of cacophony and noise-c (tests/meshd/
test_tunnel_noise.py).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
DHLEN = 32
"""Bytes of an X25519 public key and of a DH output."""
HASHLEN = 32
"""Bytes of a BLAKE2s digest."""
TAGLEN = 16
"""Bytes of a ChaCha20-Poly1305 tag."""
MESSAGE1_OVERHEAD = DHLEN + DHLEN + TAGLEN + TAGLEN
"""Message 1 = e (32) + encrypted s (32 + 16) + encrypted payload (n + 16)."""
MESSAGE2_OVERHEAD = DHLEN + TAGLEN
"""Message 2 = e (32) + encrypted payload (n + 16)."""
MAX_NONCE = 2**64 - 1
"""Reserved by the spec (§5.1): a cipher state never encrypts with it."""

_NONCE = struct.Struct("<4xQ")  # §12.3: 32 bits of zeros, then the 64-bit counter little-endian


class NoiseError(Exception):
    """A handshake message from the peer is malformed or fails authentication (remote error)."""


def nonce(n: int) -> bytes:
    """The ChaChaPoly nonce for counter `n` (Noise §12.3; also the transport data nonce)."""
    return _NONCE.pack(n)


def blake2s(data: bytes) -> bytes:
    """HASH(): BLAKE2s with a 32-byte digest."""
    return hashlib.blake2s(data).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC-HASH (RFC 2104 with BLAKE2s, block length 64, as Noise §4.3 requires)."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def hkdf(chaining_key: bytes, input_key_material: bytes, outputs: int) -> tuple[bytes, ...]:
    """HKDF(chaining_key, input_key_material, num_outputs) of Noise §4.3 (2 or 3 outputs)."""
    if outputs not in (2, 3):
        raise ValueError("Noise's HKDF makes 2 or 3 outputs")
    temp_key = hmac_blake2s(chaining_key, input_key_material)
    out1 = hmac_blake2s(temp_key, b"\x01")
    out2 = hmac_blake2s(temp_key, out1 + b"\x02")
    if outputs == 2:
        return out1, out2
    return out1, out2, hmac_blake2s(temp_key, out2 + b"\x03")


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of an X25519 private key."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """DH(): X25519. A public key of the wrong length or of small order raises NoiseError."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # wrong length, or an all-zero shared secret (small order point)
        raise NoiseError(f"bad X25519 public key: {exc}") from None


class CipherState:
    """CipherState (§5.1): a key (or none yet) and a nonce counter."""

    __slots__ = ("_aead", "key", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key
        """The 32-byte key, or None before the first MixKey."""
        self.n = 0
        """The next nonce."""
        self._aead = ChaCha20Poly1305(key) if key is not None else None

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise ValueError("nonce space exhausted")
        out = self._aead.encrypt(_NONCE.pack(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce space exhausted")
        try:
            out = self._aead.decrypt(_NONCE.pack(self.n), ciphertext, ad)
        except InvalidTag:
            raise NoiseError("authentication failed") from None
        self.n += 1
        return out


class SymmetricState:
    """SymmetricState (§5.2): chaining key, handshake hash and the current cipher state."""

    def __init__(self, protocol_name: bytes = PROTOCOL_NAME) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = blake2s(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, input_key_material, 2)
        self.cipher = CipherState(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = blake2s(self.h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """The two transport keys: initiator→responder, responder→initiator."""
        k1, k2 = hkdf(self.ck, b"", 2)
        return k1, k2


@dataclass(frozen=True)
class TransportKeys:
    """What a finished handshake yields for one side."""

    send: bytes
    """Key for what this side sends."""
    receive: bytes
    """Key for what this side receives."""
    handshake_hash: bytes
    """h after the last message (channel binding; equal on both sides)."""
    remote_static: bytes
    """The peer's static public key."""


class HandshakeIK:
    """One side of one IK handshake. Use `initiator()` or `responder()`.

    Initiator: `write_message_1(payload)`, then `read_message_2(message)` -> payload.
    Responder: `read_message_1(message)` -> payload (the initiator's static key is then in
    `remote_static`), then `write_message_2(payload)`. After that, `keys()`.
    """

    def __init__(
        self,
        initiator: bool,
        static: X25519PrivateKey,
        remote_static: bytes | None,
        prologue: bytes,
        ephemeral: X25519PrivateKey | None,
    ) -> None:
        self.is_initiator = initiator
        self._s = static
        self._s_pub = public_bytes(static)
        self.remote_static = remote_static
        """The peer's static public key (the responder learns it from message 1)."""
        self._e = ephemeral  # injected only by test vectors; generated when needed otherwise
        self._re: bytes | None = None
        self._step = 0
        self._ss = SymmetricState()
        self._ss.mix_hash(prologue)
        # Pre-message pattern "<- s": both sides hash the responder's static key.
        responder_static = remote_static if initiator else self._s_pub
        assert responder_static is not None
        self._ss.mix_hash(responder_static)

    @classmethod
    def initiator(
        cls,
        static: X25519PrivateKey,
        remote_static: bytes,
        prologue: bytes = b"",
        *,
        ephemeral: X25519PrivateKey | None = None,
    ) -> HandshakeIK:
        """The initiator of a handshake to the holder of `remote_static`."""
        if len(remote_static) != DHLEN:
            raise ValueError("remote_static must be a 32-byte X25519 public key")
        return cls(True, static, remote_static, prologue, ephemeral)

    @classmethod
    def responder(
        cls,
        static: X25519PrivateKey,
        prologue: bytes = b"",
        *,
        ephemeral: X25519PrivateKey | None = None,
    ) -> HandshakeIK:
        """The responder, holding `static`."""
        return cls(False, static, None, prologue, ephemeral)

    def _advance(self, step: int, initiator: bool) -> None:
        if self._step != step or self.is_initiator != initiator:
            raise RuntimeError("handshake message out of order for this role")
        self._step += 1

    def _ephemeral(self) -> X25519PrivateKey:
        if self._e is None:
            self._e = X25519PrivateKey.generate()
        return self._e

    # -> e, es, s, ss

    def write_message_1(self, payload: bytes) -> bytes:
        self._advance(0, True)
        rs = self.remote_static
        assert rs is not None
        e_pub = public_bytes(self._ephemeral())
        self._ss.mix_hash(e_pub)
        self._ss.mix_key(dh(self._ephemeral(), rs))
        encrypted_s = self._ss.encrypt_and_hash(self._s_pub)
        self._ss.mix_key(dh(self._s, rs))
        return e_pub + encrypted_s + self._ss.encrypt_and_hash(payload)

    def read_message_1(self, message: bytes) -> bytes:
        self._advance(0, False)
        if len(message) < MESSAGE1_OVERHEAD:
            raise NoiseError(f"message 1 too short ({len(message)} bytes)")
        self._re = message[:DHLEN]
        self._ss.mix_hash(self._re)
        self._ss.mix_key(dh(self._s, self._re))
        rs = self._ss.decrypt_and_hash(message[DHLEN : 2 * DHLEN + TAGLEN])
        self.remote_static = rs
        self._ss.mix_key(dh(self._s, rs))
        return self._ss.decrypt_and_hash(message[2 * DHLEN + TAGLEN :])

    # <- e, ee, se

    def write_message_2(self, payload: bytes) -> bytes:
        self._advance(1, False)
        assert self._re is not None and self.remote_static is not None
        e_pub = public_bytes(self._ephemeral())
        self._ss.mix_hash(e_pub)
        self._ss.mix_key(dh(self._ephemeral(), self._re))
        self._ss.mix_key(dh(self._ephemeral(), self.remote_static))
        return e_pub + self._ss.encrypt_and_hash(payload)

    def read_message_2(self, message: bytes) -> bytes:
        """Message 2's payload. A message that fails leaves the handshake as it was, so a forged
        response (the initiation's index is visible on the wire) cannot spoil the real one."""
        self._advance(1, True)
        saved = (self._ss.ck, self._ss.h, self._ss.cipher)
        try:
            if len(message) < MESSAGE2_OVERHEAD:
                raise NoiseError(f"message 2 too short ({len(message)} bytes)")
            re = message[:DHLEN]
            self._ss.mix_hash(re)
            self._ss.mix_key(dh(self._ephemeral(), re))
            self._ss.mix_key(dh(self._s, re))
            payload = self._ss.decrypt_and_hash(message[DHLEN:])
        except NoiseError:
            self._ss.ck, self._ss.h, self._ss.cipher = saved
            self._step -= 1
            raise
        self._re = re
        return payload

    @property
    def finished(self) -> bool:
        """Both messages have been written or read."""
        return self._step == 2

    def keys(self) -> TransportKeys:
        """Split() (§5.2) oriented for this side. Only after both messages."""
        if not self.finished:
            raise RuntimeError("handshake not finished")
        k1, k2 = self._ss.split()
        assert self.remote_static is not None
        if self.is_initiator:
            return TransportKeys(k1, k2, self._ss.h, self.remote_static)
        return TransportKeys(k2, k1, self._ss.h, self.remote_static)
