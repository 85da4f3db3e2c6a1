use super::*;
use std::time::Duration;

fn kv<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes()))
}

#[test]
fn keys_under_the_prefix_with_upsync_values() {
    let servers = servers_from_kv(
        "up/db/",
        kv(&[
            ("up/db/", ""),
            (
                "up/db/10.0.0.2:3306",
                r#"{"weight":"3","max_fails":1,"fail_timeout":5,"down":0,"backup":1}"#,
            ),
            ("up/db/10.0.0.1:3306", ""),
            ("up/dbfoo/10.0.0.9:1", ""),
            ("up/db2/10.0.0.8:1", ""),
        ]),
    )
    .unwrap();
    let servers = normalise(servers);
    assert_eq!(servers.len(), 2);
    assert_eq!(servers[0].addr, "10.0.0.1:3306".parse().unwrap());
    assert_eq!((servers[0].weight, servers[0].max_fails), (1, 2));
    assert_eq!(servers[1].weight, 3);
    assert_eq!(servers[1].fail_timeout, Duration::from_secs(5));
    assert!(servers[1].backup && !servers[1].down);
}

#[test]
fn bad_entries_name_their_key() {
    for (pairs, key) in [
        (vec![("up/db/10.0.0.1:1", "{not json")], "up/db/10.0.0.1:1"),
        (vec![("up/db/db.example:1", "")], "up/db/db.example:1"),
        (vec![("up/db/sub/10.0.0.1:1", "")], "up/db/sub/10.0.0.1:1"),
        (
            vec![("up/db/10.0.0.1:1", r#"{"weight":"heavy"}"#)],
            "up/db/10.0.0.1:1",
        ),
    ] {
        match servers_from_kv("up/db/", kv(&pairs)) {
            Err(SourceError::BadData { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{pairs:?}: {other:?}"),
        }
    }
}

#[test]
fn urls_are_logged_without_credentials() {
    assert_eq!(
        shown_url("http://u:secret@h:1/v1/kv/x/"),
        "http://h:1/v1/kv/x/"
    );
    assert_eq!(
        shown_url("http://h:1/v1/kv/x/?dc=a&token=s3cret"),
        "http://h:1/v1/kv/x/?dc=a&token=%28hidden%29"
    );
}

#[test]
fn key_prefixes_in_urls_are_decoded() {
    assert_eq!(decoded_path("up%2Fa/b%3A1%zz"), "up/a/b:1%zz");
}
