"""Files API on SQLite and PostgreSQL: upload, validation, list/get/content/delete, isolation."""

from __future__ import annotations

from tests.conftest import PREFERENCE_ROWS, Api, jsonl


def test_upload_valid_preference_file_round_trips(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    f = upload(headers)
    assert f["object"] == "file" and f["status"] == "processed" and f["status_details"] is None
    assert f["format"] == "preference" and f["examples"] == len(PREFERENCE_ROWS)
    assert f["bytes"] == len(jsonl(PREFERENCE_ROWS))
    got = api.client.get(f"/v1/files/{f['id']}", headers=headers).json()
    assert got == f
    content = api.client.get(f"/v1/files/{f['id']}/content", headers=headers)
    assert content.status_code == 200 and content.content == jsonl(PREFERENCE_ROWS)
    listed = api.client.get("/v1/files", headers=headers).json()
    assert [x["id"] for x in listed["data"]] == [f["id"]] and listed["has_more"] is False


def test_invalid_file_names_the_bad_line(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    body = jsonl(PREFERENCE_ROWS[:3]) + b'{"prompt": "x", "chosen": "same", "rejected": "same"}\n{oops\n'
    f = upload(headers, body)
    assert f["status"] == "error"
    assert "line 4:" in f["status_details"] and "line 5:" in f["status_details"]
    assert "Traceback" not in f["status_details"]


def test_delete_then_404(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    f = upload(headers)
    deleted = api.client.delete(f"/v1/files/{f['id']}", headers=headers)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    missing = api.client.get(f"/v1/files/{f['id']}", headers=headers)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "file_not_found"


def test_other_organization_gets_404(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    mine, theirs = api.key("acme"), api.key("globex")
    f = upload(mine)
    for path in (f"/v1/files/{f['id']}", f"/v1/files/{f['id']}/content"):
        response = api.client.get(path, headers=theirs)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert api.client.delete(f"/v1/files/{f['id']}", headers=theirs).status_code == 404
    assert api.client.get("/v1/files", headers=theirs).json()["data"] == []


def test_missing_or_bad_key_is_401(api: Api) -> None:
    assert api.client.get("/v1/files").status_code == 401
    response = api.client.get("/v1/files", headers={"Authorization": "Bearer sk-alignd-nope"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_upload_without_file_part_is_400(api: Api) -> None:
    response = api.client.post("/v1/files", headers=api.key("acme"), data={"purpose": "fine-tune"})
    assert 400 <= response.status_code < 500
    assert "error" in response.json()


def test_bad_purpose_is_400(api: Api) -> None:
    response = api.client.post("/v1/files", headers=api.key("acme"), files={"file": ("a.jsonl", b"{}\n")},
                               data={"purpose": "assistants"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"


def test_pagination_with_after(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    ids = [upload(headers)["id"] for _ in range(3)]
    first = api.client.get("/v1/files?limit=2", headers=headers).json()
    assert first["has_more"] is True and len(first["data"]) == 2
    rest = api.client.get(f"/v1/files?limit=2&after={first['data'][-1]['id']}", headers=headers).json()
    assert rest["has_more"] is False
    assert {x["id"] for x in first["data"] + rest["data"]} == set(ids)
