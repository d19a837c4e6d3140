"""meshd.tunnel.noise: Noise_IK_25519_ChaChaPoly_BLAKE2s against published test vectors, and the
primitives cross-checked against RFC vectors and a second implementation."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.tunnel.noise import (
    MESSAGE1_OVERHEAD,
    PROTOCOL_NAME,
    CipherState,
    HandshakeIK,
    NoiseError,
    SymmetricState,
    blake2s,
    dh,
    hkdf,
    hmac_blake2s,
    nonce,
    public_bytes,
)


@dataclass(frozen=True)
class Vector:
    """One Noise test vector (the JSON format of the Noise wiki's "Test vectors" page)."""

    source: str
    prologue: str
    init_static: str
    init_ephemeral: str
    resp_static: str
    resp_ephemeral: str
    handshake_hash: str
    messages: tuple[tuple[str, str], ...]  # (payload, ciphertext) in order


# Both vectors share keys and payloads; the handshake messages differ with the prologue, the
# transport messages do not (they depend on the chaining key only).
_TRANSPORT = (
    ("462e20412e20486179656b", "2c256ed08fcd08c2980f954ee4beaccb61c9581340f5dd2fd1cf3b"),
    ("4361726c204d656e676572", "d6033f70eee20945c7c9dba304e397ee3b284ff5e00fd9efb095d3"),
    ("4a65616e2d426170746973746520536179",
     "a9c068ca5d8babf72560652d8e851adbfac35c8a66e810d560863173e96adf4cfe"),
    ("457567656e2042f6686d20766f6e2042617765726b",
     "2a09d8f459e5927e40fdd2eddc99bdafb04e13a26f145cb5cfe9e6ba34c94331ebc17d5156"),
)
_KEYS = {
    "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
}
RESP_STATIC_PUBLIC = "31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62"

VECTORS = [
    # haskell-cryptography/cacophony, vectors/cacophony.txt
    Vector(
        source="cacophony",
        prologue="4a6f686e2047616c74",  # "John Galt"
        handshake_hash="48f3cb8bc9319da4ba1e9933991b1c4ed4034f1f126a76d3a1fbcfd7f94248d4",
        messages=(
            ("4c756477696720766f6e204d69736573",
             "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944"
             "0b03ddc7aac5123d06a1b23b71670e32e76c28239a7ca4ac8f784de7e44c1adb"
             "fc6e83fef7352a58d9d56157400c0a737b1d171ce368229c7b752ac25b8faf4e"
             "ca690f6d896f543be02c996ab2b86b76"),
            ("4d757272617920526f746862617264",
             "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843"
             "d9b5a8927f0ac9655ef76833bc7e5561f42e691ac8404efd6fbd6308b6a27c"),
            *_TRANSPORT,
        ),
        **_KEYS,
    ),
    # rweather/noise-c, tests/vector/noise-c-basic.txt
    Vector(
        source="noise-c",
        prologue="50726f6c6f677565313233",  # "Prologue123"
        handshake_hash="45e34c56ca0de9c348e104edcf503035e5559ceed661ac22916f6f171696d994",
        messages=(
            ("4c756477696720766f6e204d69736573",
             "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944"
             "0b03ddc7aac5123d06a1b23b71670e32e76c28239a7ca4ac8f784de7e44c1adb"
             "78f2058771dfd4229fbdc85c5fba3b587b1d171ce368229c7b752ac25b8faf4e"
             "7b2fab7326f0d6fa1fdbef58de623245"),
            ("4d757272617920526f746862617264",
             "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843"
             "d9b5a8927f0ac9655ef76833bc7e55269c081ec38c61031f76fe15b2aaaad5"),
            *_TRANSPORT,
        ),
        **_KEYS,
    ),
]


def key(hex_key: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_key))


def pair(v: Vector) -> tuple[HandshakeIK, HandshakeIK]:
    prologue = bytes.fromhex(v.prologue)
    initiator = HandshakeIK.initiator(
        key(v.init_static), bytes.fromhex(RESP_STATIC_PUBLIC), prologue,
        ephemeral=key(v.init_ephemeral),
    )
    responder = HandshakeIK.responder(
        key(v.resp_static), prologue, ephemeral=key(v.resp_ephemeral)
    )
    return initiator, responder


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v.source)
def test_published_vectors(v: Vector) -> None:
    assert public_bytes(key(v.resp_static)).hex() == RESP_STATIC_PUBLIC
    initiator, responder = pair(v)
    (p1, c1), (p2, c2), *transport = v.messages

    message1 = initiator.write_message_1(bytes.fromhex(p1))
    assert message1.hex() == c1
    assert responder.read_message_1(message1).hex() == p1
    assert responder.remote_static == public_bytes(key(v.init_static))
    message2 = responder.write_message_2(bytes.fromhex(p2))
    assert message2.hex() == c2
    assert initiator.read_message_2(message2).hex() == p2

    i_keys, r_keys = initiator.keys(), responder.keys()
    assert i_keys.handshake_hash.hex() == v.handshake_hash == r_keys.handshake_hash.hex()
    assert (i_keys.send, i_keys.receive) == (r_keys.receive, r_keys.send)
    assert i_keys.remote_static.hex() == RESP_STATIC_PUBLIC
    # Transport messages alternate initiator -> responder, responder -> initiator, each
    # direction counting from 0: exactly the explicit-counter nonce the data plane uses.
    for i, (payload, ciphertext) in enumerate(transport):
        sender = i_keys.send if i % 2 == 0 else r_keys.send
        sealed = ChaCha20Poly1305(sender).encrypt(nonce(i // 2), bytes.fromhex(payload), b"")
        assert sealed.hex() == ciphertext


def test_protocol_name_is_hashed_because_it_is_longer_than_hashlen() -> None:
    assert len(PROTOCOL_NAME) == 33
    state = SymmetricState()
    assert state.h == state.ck == blake2s(PROTOCOL_NAME)
    short = SymmetricState(b"Noise_NN_25519_AESGCM_SHA256")
    assert short.h == b"Noise_NN_25519_AESGCM_SHA256".ljust(32, b"\x00")


def test_primitives_match_rfc_vectors_and_a_second_implementation() -> None:
    # RFC 7693 Appendix B: BLAKE2s-256("abc").
    assert blake2s(b"abc").hex() == (
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    )
    # HMAC-BLAKE2s: the stdlib construction against cryptography's.
    for k, data in [(b"", b""), (b"k" * 32, b"data"), (b"x" * 100, b"y" * 200)]:
        ref = crypto_hmac.HMAC(k, hashes.BLAKE2s(32))
        ref.update(data)
        assert hmac_blake2s(k, data) == ref.finalize()
    # RFC 7748 §6.1: X25519 between Alice and Bob.
    alice = key("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert public_bytes(alice).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert dh(alice, bob_public).hex() == (
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )
    # RFC 8439 §2.8.2: the AEAD_CHACHA20_POLY1305 example (its nonce is not Noise's layout).
    aead = ChaCha20Poly1305(bytes(range(0x80, 0xA0)))
    sealed = aead.encrypt(
        bytes.fromhex("070000004041424344454647"),
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it.",
        bytes.fromhex("50515253c0c1c2c3c4c5c6c7"),
    )
    assert sealed[-16:].hex() == "1ae10b594f09e26a7e902ecbd0600691"
    assert nonce(1) == bytes(4) + (1).to_bytes(8, "little")


def test_hkdf_follows_the_noise_definition() -> None:
    ck, ikm = b"c" * 32, b"i" * 32
    temp = hmac_blake2s(ck, ikm)
    one = hmac_blake2s(temp, b"\x01")
    two = hmac_blake2s(temp, one + b"\x02")
    three = hmac_blake2s(temp, two + b"\x03")
    assert hkdf(ck, ikm, 2) == (one, two)
    assert hkdf(ck, ikm, 3) == (one, two, three)
    with pytest.raises(ValueError):
        hkdf(ck, ikm, 4)


def test_cipher_state_without_key_passes_through_and_counts_nonces() -> None:
    empty = CipherState()
    assert empty.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert empty.decrypt_with_ad(b"ad", b"plain") == b"plain"
    sender, receiver = CipherState(b"k" * 32), CipherState(b"k" * 32)
    for i in range(3):
        assert receiver.decrypt_with_ad(b"ad", sender.encrypt_with_ad(b"ad", bytes([i]))) == (
            bytes([i])
        )
    assert sender.n == receiver.n == 3
    with pytest.raises(NoiseError):
        receiver.decrypt_with_ad(b"other ad", sender.encrypt_with_ad(b"ad", b"x"))
    assert receiver.n == 3  # a failed decryption does not consume a nonce


def fresh_pair() -> tuple[HandshakeIK, HandshakeIK, X25519PrivateKey]:
    responder_key = X25519PrivateKey.generate()
    initiator = HandshakeIK.initiator(
        X25519PrivateKey.generate(), public_bytes(responder_key), b"p"
    )
    return initiator, HandshakeIK.responder(responder_key, b"p"), responder_key


def test_a_forged_response_does_not_spoil_the_real_one() -> None:
    initiator, responder, _ = fresh_pair()
    responder.read_message_1(initiator.write_message_1(b"hello"))
    real = responder.write_message_2(b"welcome")
    for forged in (b"", real[:-1], bytes(len(real)), real[:10] + bytes([real[10] ^ 1]) + real[11:]):
        with pytest.raises(NoiseError):
            initiator.read_message_2(forged)
        assert not initiator.finished
    assert initiator.read_message_2(real) == b"welcome"
    assert initiator.keys().send == responder.keys().receive


def test_message1_for_another_responder_or_with_another_prologue_fails() -> None:
    initiator, _, _ = fresh_pair()
    message = initiator.write_message_1(b"")
    with pytest.raises(NoiseError):
        HandshakeIK.responder(X25519PrivateKey.generate(), b"p").read_message_1(message)
    initiator, _, responder_key = fresh_pair()
    message = initiator.write_message_1(b"")
    with pytest.raises(NoiseError):
        HandshakeIK.responder(responder_key, b"other prologue").read_message_1(message)


def test_small_order_public_keys_are_refused() -> None:
    responder_key = X25519PrivateKey.generate()
    message = bytes(32) + bytes(MESSAGE1_OVERHEAD - 32)  # e = 0: a small-order point
    with pytest.raises(NoiseError, match="bad X25519"):
        HandshakeIK.responder(responder_key).read_message_1(message)


def test_misuse_is_a_local_error() -> None:
    initiator, responder, _ = fresh_pair()
    with pytest.raises(RuntimeError):
        initiator.read_message_2(b"")
    with pytest.raises(RuntimeError):
        responder.write_message_2(b"")
    with pytest.raises(RuntimeError):
        initiator.keys()
    with pytest.raises(ValueError):
        HandshakeIK.initiator(X25519PrivateKey.generate(), b"short")


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_message1_bytes_decrypt_or_raise_noise_error(data: bytes) -> None:
    with pytest.raises(NoiseError):
        HandshakeIK.responder(X25519PrivateKey.generate()).read_message_1(data)


@settings(max_examples=100)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_round_trip_any_payloads(p1: bytes, p2: bytes) -> None:
    initiator, responder, _ = fresh_pair()
    assert responder.read_message_1(initiator.write_message_1(p1)) == p1
    assert initiator.read_message_2(responder.write_message_2(p2)) == p2
    assert initiator.keys().handshake_hash == responder.keys().handshake_hash
