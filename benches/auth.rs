//! The whole auth step (extract the key from a header map, hash, look up, check expiry and
//! scope) against key tables of 10, 10,000 and 1,000,000 keys.
//!
//! `cargo bench --bench auth`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use keygate::counters::Counters;
use keygate::keys::{Entries, KeyEntry, KeyExtras, KeyHash, KeyTable, PresentedKey, ScopeSet};
use keygate::proxy::auth::{AuthSettings, Source, authenticate, verify};
use keygate::proxy::forward::{Added, set_identity};
use keygate::proxy::route::ScopeRule;

fn table(n: usize) -> (KeyTable, Vec<String>) {
    let scopes = Arc::new(ScopeSet::new(vec!["read".into(), "write".into()]).unwrap());
    let expires_at = Some(SystemTime::now() + Duration::from_secs(86_400));
    let mut entries = Entries::default();
    let mut probes = Vec::new();
    for i in 0..n {
        // Cheap stand-ins with the generated keys' length; checksums are checked separately.
        let key = format!("legacy_{i:038}");
        let entry = KeyEntry::new(
            KeyHash::of(&key),
            HeaderValue::from_str(&format!("{i:08x}")).unwrap(),
            HeaderValue::from_static("bench"),
            Arc::clone(&scopes),
            expires_at,
            KeyExtras::default(),
        );
        entries.push(entry);
        if i % (n / 10).max(1) == 0 {
            probes.push(key);
        }
    }
    let (table, duplicates) = KeyTable::build(entries);
    assert!(duplicates.is_empty());
    (table, probes)
}

fn auth(c: &mut Criterion) {
    let settings = AuthSettings {
        sources: vec![
            Source::parse("header:x-api-key").unwrap(),
            Source::parse("authorization:Bearer").unwrap(),
        ],
        key_prefix: "kg".into(),
    };
    let rule = ScopeRule {
        by_method: vec![(Method::GET, vec!["read".into()].into())],
        other: Some(vec!["write".into()].into()),
    };
    let mut group = c.benchmark_group("auth_step");
    for n in [10, 10_000, 1_000_000] {
        let (table, probes) = table(n);
        let requests: Vec<HeaderMap> = probes
            .iter()
            .map(|key| {
                let mut headers = HeaderMap::new();
                headers.insert("host", HeaderValue::from_static("api.example.com"));
                headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
                headers.insert("accept", HeaderValue::from_static("application/json"));
                headers.insert("x-api-key", HeaderValue::from_str(key).unwrap());
                headers
            })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &requests, |b, requests| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % requests.len();
                let now = SystemTime::now();
                let key = authenticate(&settings, &table, Some(&rule), &Method::GET, &requests[i], None, now);
                black_box(key.map(|k| k.id.len()))
            });
        });
    }
    group.finish();

    // Timing oracle check: an unknown key costs what a valid one does (hash, one lookup), so
    // response time says nothing about how close a guess was. Compare with auth_step/1000000.
    let (big, _) = table(1_000_000);
    let mut unknown = HeaderMap::new();
    unknown.insert("x-api-key", HeaderValue::from_static("legacy_not-a-key-in-the-table-000000000000"));
    c.bench_function("auth_step/unknown_key_1000000", |b| {
        b.iter(|| {
            let refused =
                authenticate(&settings, &big, Some(&rule), &Method::GET, &unknown, None, SystemTime::now());
            black_box(refused.is_err())
        })
    });
    drop(big);

    // The refusal path: a key in keygate's format with a bad checksum never reaches the table.
    let (table, _) = table(10);
    let mut forged = HeaderMap::new();
    forged
        .insert("x-api-key", HeaderValue::from_static("kg_abcdefgh_0123456789abcdefghijABCDEFGHIJab000000"));
    c.bench_function("auth_step/forged_checksum", |b| {
        b.iter(|| {
            black_box(
                authenticate(&settings, &table, Some(&rule), &Method::GET, &forged, None, SystemTime::now())
                    .is_err(),
            )
        })
    });
}

/// The per-key part of a proxied request, for keys spread across the table as
/// benches/load.sh sends them: look the key up, note its use, clone its identity into the
/// upstream request's headers (and the access log). With a million keys, what this costs
/// above the one-key figure is cache and TLB misses, not instructions.
fn per_key(c: &mut Criterion) {
    let settings =
        AuthSettings { sources: vec![Source::parse("header:x-api-key").unwrap()], key_prefix: "kg".into() };
    let mut group = c.benchmark_group("per_key_work");
    for n in [1, 10_000, 1_000_000] {
        let (table, _) = table(n);
        // 10,000 keys spread evenly across the table, in a shuffled but fixed order.
        let step = (n / 10_000).max(1);
        let mut keys: Vec<String> = (0..n).step_by(step).map(|i| format!("legacy_{i:038}")).collect();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for i in (1..keys.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            keys.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let counters = keygate::counters::memory::Memory::default();
        group.bench_with_input(BenchmarkId::from_parameter(n), &keys, |b, keys| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % keys.len();
                let now = SystemTime::now();
                let key = verify(PresentedKey::new(&keys[i]), &settings, &table, now).unwrap();
                let logged = key.id.clone();
                counters.record(key.id.as_bytes(), key.usage_period(), now);
                let mut added = Added::with_capacity(8);
                set_identity(&mut added, key);
                black_box((logged, added))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, auth, per_key);
criterion_main!(benches);
