use super::local::ranks;
use super::*;

/// Run `f` on `n` thread ranks; their results in rank order.
fn on_ranks<T: Send>(n: usize, f: impl Fn(&dyn Comm) -> T + Sync) -> Vec<T> {
    let comms = ranks(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || f(&c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn map_gives_every_rank_every_result_in_item_order() {
    for size in [1, 2, 3, 5] {
        let out = on_ranks(size, |c| {
            map(c, "squares", 7, |i| {
                // Each item is computed by the rank that owns it.
                assert_eq!(i % c.size(), c.rank());
                Ok((i * i) as f64 + 0.1)
            })
            .unwrap()
        });
        let want: Vec<f64> = (0..7).map(|i| (i * i) as f64 + 0.1).collect();
        assert!(out.iter().all(|o| *o == want), "size {size}: {out:?}");
    }
}

#[test]
fn an_error_on_one_rank_is_every_ranks_error() {
    let out = on_ranks(3, |c| {
        map(c, "items", 6, |i| match i {
            4 => Err(Error::Input("item 4 is bad".into())),
            _ => Ok(i),
        })
        .map_err(|e| e.to_string())
    });
    for o in out {
        let e = o.unwrap_err();
        assert!(
            e.contains("on rank 1") && e.contains("item 4 is bad"),
            "{e}"
        );
    }
}

#[test]
fn all_sum_agrees_bit_for_bit_and_broadcast_hands_rank_0s_value() {
    let out = on_ranks(3, |c| {
        let mut xs: Vec<f32> = (0..5).map(|i| 0.1 * (i + c.rank()) as f32).collect();
        all_sum(c, "grads", &mut xs).unwrap();
        let b = broadcast(c, "cfg", is_root(c).then(|| format!("from {}", c.rank()))).unwrap();
        (xs, b)
    });
    let want: Vec<f32> = (0..5)
        .map(|i| 0f32 + 0.1 * i as f32 + 0.1 * (i + 1) as f32 + 0.1 * (i + 2) as f32)
        .collect();
    for (xs, b) in out {
        assert_eq!(xs, want);
        assert_eq!(b, "from 0");
    }
}

#[test]
fn groups_split_consecutive_ranks() {
    let out = on_ranks(5, |c| {
        let (g, count, sub) = groups(c, 2).unwrap();
        let members = map(sub.as_ref(), "members", sub.size(), |_| Ok(c.rank())).unwrap();
        (g, count, sub.rank(), members)
    });
    assert_eq!(out[0], (0, 2, 0, vec![0, 1]));
    assert_eq!(out[1], (0, 2, 1, vec![0, 1]));
    assert_eq!(out[2], (1, 2, 0, vec![2, 3, 4]));
    assert_eq!(out[4], (1, 2, 2, vec![2, 3, 4]));
}

/// A thread rank that fails outside a collective stops the others at theirs (waiting or to
/// come, in the group and in groups split from it) with an error naming it, instead of
/// leaving them waiting.
#[test]
fn a_failed_thread_rank_stops_the_others_instead_of_hanging_them() {
    let comms = ranks(3);
    let out: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (comms.into_iter())
            .map(|c| {
                s.spawn(move || {
                    let guard = c.abort_on_drop();
                    let result = (|| -> Result<()> {
                        let half = c.split(c.rank() % 2)?;
                        barrier(&c, "start")?;
                        if c.rank() == 2 {
                            return Err(Error::Input("disk full".into()));
                        }
                        // Rank 0 waits in the group it shares with rank 2, rank 1 alone.
                        barrier(half.as_ref(), "half")?;
                        barrier(&c, "end")
                    })();
                    if result.is_ok() {
                        guard.disarm();
                    }
                    result.map_err(|e| e.to_string()).unwrap_err()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(out[2], "disk full");
    for e in &out[..2] {
        assert!(e.contains("rank 2 stopped: it failed"), "{e}");
    }
}
