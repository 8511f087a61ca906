//! A second engine, written only against the `Engine` trait: it "generates" by echoing the
//! prompt back, token by token, and keeps a tiny LRU prefix cache of the prompt's full blocks,
//! whose changes it reports as KV events. It cannot list its own cache: a frontend that missed
//! its events is recovered by the worker runtime's ring and mirror alone.

use std::collections::VecDeque;

use kvgate::contract::events::{EngineHash, KvEventKind, StoredBlock};
use kvgate::contract::{DisaggStyle, EngineKind, FinishReason, LoadReport, WorkerOutput};
use kvgate::kv::hash::{BlockHasher, SeqHash};
use kvgate::worker::{Engine, EngineCard, EngineIo};

pub struct EchoEngine {
    pub page_size: usize,
    /// Blocks it caches at most (least recently used evicted first).
    pub capacity_blocks: usize,
}

impl Engine for EchoEngine {
    fn card(&self) -> EngineCard {
        EngineCard {
            kind: EngineKind::Mocker,
            kv_capacity_blocks: self.capacity_blocks as u64,
            max_num_seqs: 1,
            max_num_batched_tokens: 1 << 16,
            disagg: DisaggStyle::Push,
            bootstrap: None,
            kv_events: true,
        }
    }

    async fn run(self, mut io: EngineIo) {
        {
            let hasher = BlockHasher::new(self.page_size);
            // Most recently used last.
            let mut cache: VecDeque<SeqHash> = VecDeque::new();
            loop {
                let item = tokio::select! {
                    item = io.intake.recv() => match item { Some(item) => item, None => break },
                    Some(reply) = io.resets.recv() => {
                        cache.clear();
                        io.events.send(vec![KvEventKind::Cleared]).await;
                        io.events.ack(reply).await;
                        continue;
                    }
                };
                let prompt = &item.request.token_ids;
                let mut events = Vec::new();
                let mut cached = 0;
                let mut parent = None;
                let mut new_run: Vec<StoredBlock> = Vec::new();
                let mut run_parent = None;
                for seq in hasher.seq_hashes(prompt) {
                    if let Some(i) = cache.iter().position(|&h| h == seq) {
                        cache.remove(i);
                        if new_run.is_empty() {
                            cached += self.page_size;
                        }
                    } else {
                        if new_run.is_empty() {
                            run_parent = parent;
                        }
                        new_run.push(StoredBlock { seq_hash: seq, engine_hash: EngineHash(!seq.0) });
                    }
                    cache.push_back(seq);
                    parent = Some(seq);
                }
                while cache.len() > self.capacity_blocks {
                    let old = cache.pop_front().expect("non-empty");
                    match new_run.iter().position(|b| b.seq_hash == old) {
                        // Never published: nothing to remove.
                        Some(i) => drop(new_run.remove(i)),
                        None => events.push(KvEventKind::Removed { engine_hashes: vec![EngineHash(!old.0)] }),
                    }
                }
                if !new_run.is_empty() {
                    events.insert(0, KvEventKind::Stored { parent: run_parent, blocks: new_run });
                }
                io.events.send(events).await;
                let _ = io.load.send(LoadReport { active_blocks: cache.len() as u64, ..LoadReport::default() });
                let n = (item.request.sampling.max_tokens as usize).min(prompt.len());
                let outputs = [
                    WorkerOutput::Started {
                        cached_tokens: cached as u32,
                        computed_tokens: (prompt.len() - cached) as u32,
                    },
                    WorkerOutput::Tokens(prompt[..n].to_vec()),
                    WorkerOutput::Finished { reason: FinishReason::Length },
                ];
                for o in outputs {
                    if item.reply.send(o).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}
