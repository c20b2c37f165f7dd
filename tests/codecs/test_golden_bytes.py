"""Golden bytes: every codec's payload for a fixed input, seed, key and step.

The digests were taken from the code before the codec-architecture refactor (issue 12),
so any change to what goes on the wire (a header field, an array's dtype or order, a
rounding, a random stream, the slicing of the quantized collectives) fails here.  The
inputs are in ``_golden_cases.py``.
"""

from __future__ import annotations

import hashlib

import pytest
from _golden_cases import CASES, SLICES, payload_bytes, sliced_bytes

#: sha256 of ``codec.encode(x, key=..., step=...).to_bytes()`` per case.
PAYLOADS = {
    "NoCompression-f32": "d24030ee024b57668a9d79ffa2a70397fdc3c4e95ddcb99df728b6d8a0fa2be9",
    "NoCompression-f64": "cc248b0f9ea0e38a4541d884dffa875ea3eacab09f810a1161ec89edb0032150",
    "FP16-f32": "7b7fab097c2d0bf470b3c8a7ea8854337f90f242969a4c5b13bf23dc9feff21f",
    "FP16-f64": "d9eabd869df2b5d97ababb7e34557cdcb7dbe7a26c7475bb2f24b8d30cafb9f9",
    "TopK-k-f32": "3dcf9678e88db234c72fbb59b7ce45d32903974666940e19cc29819fbfa17755",
    "TopK-density-f64": "6cef2ab920cf4c1547c097bb13fe1f3f1ba697d0082ea976795a051e32de88bf",
    "QSGD-4bit-f32": "a0ce8a6ee965bf97e21a107b0f48ce07b691a693ce89cf6fdb78873336e882a4",
    "QSGD-levels1-max-f32": "f70b4edc3907f2a0a6b27dc8d0a07cdcfe12788f6a4640c97c198ce563bc35f2",
    "QSGD-8bit-f64": "0eb2d94952a492d796c761a2b0c1c98ef753d8083df1dfb91cb6c6deb0dabec7",
    "TernGrad-f32": "581689ceb47770839fb0323d2437dcf24eb6931a27cfcdb3c1d9c93e21ccd415",
    "TernGrad-bucket-clip-f64": "f8a9f84c35998550443e1f9a229122cb5c858865e1af93535d834a6b034aa09d",
    "TernGrad-shared-scale-f32": "085fbbe23c0cf453f9081569819efe6f8e57551e8c2dd057400925b9944b3238",
    "OneBit-noef-f32": "efa6151ee58cc054a1f305c88a7d4f8fbedec68729c247e3d63a61b0916aefef",
    "OneBit-ef-f32": "40f16a0abc591ee8d7fd299ed27bd89bbb392014db282fc5056c3c93eae58c45",
    "OneBit-ef-f64": "4c22f429e7dd1c58bdafe8e1425e61ba1aa8bd6b9d5a12c3d93bff9e127ee03f",
    "ErrorFeedback-TopK-f32": "afacc039ecbae7d5201a652dd2d1841b3a1135d8106aeb16faa46cf44eeae9b9",
    "ErrorFeedback-QSGD-f64": "f4ddacc8cee68e00ed72501f4041c0b5eb9877d8e4ba373848384f9aa1e2c7c8",
}

#: sha256 of the chunk alignment and the sliced payloads of three owners per case.
SLICED = {
    "FP16": "827e961a649370398177314c849e516fd54ebd166eab3cd6d77dacccf01ce4f8",
    "QSGD-4bit-bucket7": "411b3198df4f4a1ea6d220fe30764ad0e7b475fd7ea0d9db4ddb6054c052ffe4",
    "QSGD-3bit": "0b09639a00c816021ceb0757ca9c0bdca8d4801b7d2048eeca38d223552ba743",
    "TernGrad-tensor": "bf3ffb688e2b4816619040dd78ef255fff8eb30ab90a47599ffc6a9aa7ccf452",
    "TernGrad-bucket5": "f220202945fb789a51838b3b909cdf2a6595ee41a4eb7a9a2ce6dafb8c297312",
    "OneBit-bucket4": "b6557d4ae43e2609216e90dc7a05e451764723d10fb88b360b845242bc198a92",
}


def test_every_case_has_a_digest():
    assert set(PAYLOADS) == set(CASES)
    assert set(SLICED) == set(SLICES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_payload_bytes_are_unchanged(name):
    assert hashlib.sha256(payload_bytes(name)).hexdigest() == PAYLOADS[name]


@pytest.mark.parametrize("name", sorted(SLICES))
def test_sliced_payload_bytes_are_unchanged(name):
    assert hashlib.sha256(sliced_bytes(name)).hexdigest() == SLICED[name]
