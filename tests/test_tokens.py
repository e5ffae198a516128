"""The one local token rule (gemframe._core.tokens): the estimate counts request bodies, the
TPM limiter the bytes it sends; both must get the same number for the same request."""

import base64

import pytest

import gemframe as gf
from gemframe._core.payload import RequestBuilder, request_json
from gemframe._core.tokens import MEDIA_TOKENS, count_tokens

PDF_2_PAGES = b"%PDF-1.4\n1 0 obj << /Type /Page >> endobj\n2 0 obj << /Type /Page >> endobj\n%%EOF"


@pytest.mark.parametrize("provider", ["google", "segmind"])
def test_the_bytes_sent_count_as_their_body_in_every_dialect(provider, image_bytes):
    builder = RequestBuilder("Be brief.", None, None, None)
    body = builder.build("Describe these." * 10, [image_bytes(), PDF_2_PAGES], None)
    with gf.Client(provider, api_key="k", base_url="http://127.0.0.1:9", progress=False) as client:
        sent = request_json(client.provider.wrap(body))  # what the executor's TPM bucket sees
    expected = 3 + 38 + MEDIA_TOKENS * (1 + 2)  # system, prompt, an image and a 2-page PDF
    assert count_tokens(body) == count_tokens(sent) == expected


def test_parts_beyond_text_and_media():
    call = {"functionCall": {"name": "f", "args": {"x": 1}}}  # its JSON, 31 characters: 8 tokens
    body = {"contents": [{"role": "model", "parts": [call, {"text": ""}, {"fileData": {"fileUri": "u"}}]}]}
    assert count_tokens(body) == 8 + 0 + MEDIA_TOKENS
    not_a_pdf = {"inlineData": {"mimeType": "application/pdf", "data": base64.b64encode(b"%PDX").decode()}}
    assert count_tokens({"contents": [{"parts": [not_a_pdf]}]}) == MEDIA_TOKENS
    assert count_tokens(b"not json at all") == 3  # bytes that are not JSON: length / 4
