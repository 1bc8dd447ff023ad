//! The multi-sequence engine on the CPU: batched greedy outputs equal single-sequence ones
//! while requests join and leave mid-run, the paged forward equals the contiguous one, and a
//! full page pool makes requests wait (or refuses one that could never fit).

use std::collections::HashMap;
use std::sync::Arc;

use rocforge_kernels::GgmlType;
use rocforge_runtime::engine::{Engine, EngineOptions, Event, Request};
use rocforge_runtime::testing::{
    agrees_with, greedy_refs, real_model, refs_file, skip_or_fail, tiny_gemma3, tiny_model,
    FETCH_SMOLLM2,
};
use rocforge_runtime::{
    backend, BackendKind, BackendOptions, Error, GenerateOptions, Generation, Model, SamplerConfig,
    SeqBatch, Session, StopReason,
};

fn load(name: &str, w: rocforge_runtime::gguf::GgufWriter) -> Arc<Model> {
    let dir = std::env::temp_dir().join(format!("rocforge-engine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    w.write_file(&path).unwrap();
    Model::load(&path).unwrap()
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler: SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        },
        stop_at_eog: false,
    }
}

/// Prompts of several lengths (ids from a fixed pseudo-random walk over the vocabulary).
fn prompts(n_vocab: usize, lens: &[usize]) -> Vec<Vec<u32>> {
    let mut x = 12345u64;
    lens.iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % n_vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn single(model: &Arc<Model>, prompt: &[u32], opts: &GenerateOptions) -> Generation {
    let mut s = Session::new(
        model.clone(),
        BackendKind::Cpu,
        BackendOptions {
            ctx: 256,
            max_batch: 64,
        },
    )
    .unwrap();
    s.generate(prompt, opts, |_| true).unwrap()
}

/// Runs every request through `engine`, checking the events on the way; returns the
/// generations in request order and the most sequences seen running at once.
fn run_all(engine: &mut Engine, reqs: Vec<Request>) -> (Vec<Generation>, usize) {
    let ids: Vec<u64> = reqs.into_iter().map(|r| engine.add(r).unwrap()).collect();
    let mut out: HashMap<u64, Generation> = HashMap::new();
    let mut streamed: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut most = 0;
    let mut steps = 0;
    while !engine.is_idle() {
        for e in engine.step().unwrap() {
            match e {
                Event::Token { id, token, .. } => streamed.entry(id).or_default().push(token),
                Event::Finished { id, generation } => {
                    assert!(out.insert(id, generation).is_none(), "{id} finished twice")
                }
            }
        }
        most = most.max(engine.running());
        steps += 1;
        assert!(steps < 10_000, "the engine does not finish");
    }
    let gens: Vec<Generation> = ids.iter().map(|id| out.remove(id).unwrap()).collect();
    for (id, g) in ids.iter().zip(&gens) {
        let s = streamed.remove(id).unwrap_or_default();
        assert_eq!(
            s[..],
            g.generated_tokens[..s.len()],
            "streamed tokens of {id}"
        );
    }
    if let Some((free, total)) = engine.pages() {
        assert_eq!(free, total, "every page is given back");
    }
    (gens, most)
}

fn batched_equals_single(model: &Arc<Model>, lens: &[usize], max_tokens: &[usize]) {
    let ps = prompts(model.config.n_vocab, lens);
    let mut engine = Engine::new(
        model.clone(),
        BackendKind::Cpu,
        EngineOptions {
            max_seqs: 3,
            seq_ctx: 128,
            pool_tokens: None,
            step_tokens: 16,
        },
    )
    .unwrap();
    assert_eq!(engine.parallel(), 3);
    let reqs = ps
        .iter()
        .zip(max_tokens)
        .map(|(p, &m)| Request::new(p.clone(), greedy(m)))
        .collect();
    let (gens, most) = run_all(&mut engine, reqs);
    assert_eq!(most, 3, "three sequences ran together");
    for ((p, &m), g) in ps.iter().zip(max_tokens).zip(&gens) {
        let want = single(model, p, &greedy(m));
        assert_eq!(
            g.generated_tokens,
            want.generated_tokens,
            "prompt of {}",
            p.len()
        );
        assert_eq!(g.text, want.text);
        assert_eq!(g.stop_reason, StopReason::MaxTokens);
        assert_eq!(g.timings.inter_token_ms.len(), m.saturating_sub(1));
    }
}

#[test]
fn batched_greedy_equals_single_sequence_llama() {
    let model = load("tiny-q4_0", tiny_model(GgmlType::Q4_0, 3));
    // Prompts longer than the step budget join over several steps; max-tokens differ, so
    // sequences leave at different steps and waiting ones take their place.
    batched_equals_single(&model, &[3, 40, 17, 1, 29, 8], &[12, 5, 20, 9, 1, 30]);
}

#[test]
fn batched_greedy_equals_single_sequence_gemma3_sliding_window() {
    // Windows of 8 keys cross page boundaries (16 tokens).
    let model = load("tiny-gemma3-q8_0", tiny_gemma3(GgmlType::Q8_0, 5));
    batched_equals_single(&model, &[21, 5, 33, 12], &[25, 14, 6, 30]);
}

#[test]
fn paged_forward_gives_the_same_logits_as_contiguous() {
    let model = load("tiny-q8_0", tiny_model(GgmlType::Q8_0, 9));
    let opts = BackendOptions {
        ctx: 128,
        max_batch: 32,
    };
    let ps = prompts(model.config.n_vocab, &[19, 7]);
    let mut want = Vec::new();
    for p in &ps {
        let mut b = backend::create(BackendKind::Cpu, model.clone(), &opts).unwrap();
        b.forward(p, 0, false).unwrap();
        want.push(b.logits().unwrap().to_vec());
    }
    let mut b = backend::create(BackendKind::Cpu, model.clone(), &opts).unwrap();
    assert_eq!(b.kv_page_size(), Some(16));
    // Scattered, non-contiguous pages, in different orders.
    let (pa, pb) = ([5u32, 1], [7u32]);
    let seqs = [
        SeqBatch {
            tokens: &ps[0],
            pos: 0,
            pages: &pa,
            logits: true,
        },
        SeqBatch {
            tokens: &ps[1],
            pos: 0,
            pages: &pb,
            logits: true,
        },
    ];
    b.forward_seqs(&seqs).unwrap();
    let got = b.logits().unwrap();
    let n = model.config.n_vocab;
    assert_eq!(got.len(), 2 * n);
    assert_eq!(got[..n], want[0][..]);
    assert_eq!(got[n..], want[1][..]);
    // A table too short for the positions is refused, not a panic.
    let short = [SeqBatch {
        tokens: &ps[0],
        pos: 0,
        pages: &pb,
        logits: true,
    }];
    assert!(matches!(
        b.forward_seqs(&short),
        Err(Error::ContextFull { .. })
    ));
    let outside = [SeqBatch {
        tokens: &ps[1],
        pos: 0,
        pages: &[8],
        logits: true,
    }];
    assert!(b.forward_seqs(&outside).is_err());
}

#[test]
fn a_full_pool_makes_requests_wait_and_refuses_what_never_fits() {
    let model = load("tiny-q4_1", tiny_model(GgmlType::Q4_1, 4));
    // 64 tokens of pool: four pages. A 30-token prompt with 20 to generate may fill 49
    // positions (the last token is never evaluated): four pages, so one request at a time.
    let mut engine = Engine::new(
        model.clone(),
        BackendKind::Cpu,
        EngineOptions {
            max_seqs: 4,
            seq_ctx: 64,
            pool_tokens: Some(64),
            step_tokens: 32,
        },
    )
    .unwrap();
    assert_eq!(engine.pages(), Some((4, 4)));
    let ps = prompts(model.config.n_vocab, &[30, 30, 30]);
    let reqs: Vec<Request> = ps
        .iter()
        .map(|p| Request::new(p.clone(), greedy(20)))
        .collect();
    // 60 prompt + 39 evaluated generated tokens fit a sequence's 128 but never the pool.
    let mut big = Engine::new(
        model.clone(),
        BackendKind::Cpu,
        EngineOptions {
            max_seqs: 2,
            seq_ctx: 128,
            pool_tokens: Some(64),
            step_tokens: 32,
        },
    )
    .unwrap();
    let huge = prompts(model.config.n_vocab, &[60]).remove(0);
    let err = big.add(Request::new(huge.clone(), greedy(40))).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ContextFull {
                needed: 99,
                capacity: 64
            }
        ),
        "{err}"
    );
    assert!(big.add(Request::new(huge, greedy(4))).is_ok());
    let (gens, most) = run_all(&mut engine, reqs);
    assert_eq!(most, 1, "the others wait for pages");
    for (p, g) in ps.iter().zip(&gens) {
        assert_eq!(
            g.generated_tokens,
            single(&model, p, &greedy(20)).generated_tokens
        );
    }
    // A prompt longer than a sequence's context is refused at once.
    let long = prompts(model.config.n_vocab, &[65]).remove(0);
    assert!(matches!(
        engine.add(Request::new(long, greedy(1))),
        Err(Error::ContextFull { .. })
    ));
    assert!(engine.add(Request::new(vec![u32::MAX], greedy(1))).is_err());
    // Text is tokenized as the CLI does.
    let id = engine.add_text("hello world", greedy(3)).unwrap();
    let mut got = None;
    engine
        .run(|e| {
            if let Event::Finished { id: i, generation } = e {
                assert_eq!(*i, id);
                got = Some(generation.clone());
            }
        })
        .unwrap();
    let ids = model.tokenizer.encode("hello world", true, true).unwrap();
    let got = got.unwrap();
    assert_eq!(got.prompt_tokens, ids);
    assert_eq!(
        got.generated_tokens,
        single(&model, &ids, &greedy(3)).generated_tokens
    );
    assert!(engine.add(Request::new(Vec::new(), greedy(1))).is_err());
}

#[test]
fn cancelled_requests_leave_and_the_others_are_unchanged() {
    let model = load("tiny-q4_0-cancel", tiny_model(GgmlType::Q4_0, 11));
    let mut engine = Engine::new(
        model.clone(),
        BackendKind::Cpu,
        EngineOptions {
            max_seqs: 2,
            seq_ctx: 96,
            pool_tokens: None,
            step_tokens: 8,
        },
    )
    .unwrap();
    let ps = prompts(model.config.n_vocab, &[10, 12, 9]);
    let ids: Vec<u64> = ps
        .iter()
        .map(|p| engine.add(Request::new(p.clone(), greedy(15))).unwrap())
        .collect();
    for _ in 0..4 {
        engine.step().unwrap();
    }
    assert_eq!((engine.running(), engine.waiting()), (2, 1));
    assert!(engine.cancel(ids[0]), "a running request is cancelled");
    assert!(engine.cancel(ids[2]), "a waiting request is cancelled");
    assert!(!engine.cancel(999), "no such request");
    let mut finished = HashMap::new();
    engine
        .run(|e| {
            if let Event::Finished { id, generation } = e {
                finished.insert(*id, generation.clone());
            }
        })
        .unwrap();
    assert_eq!(finished[&ids[0]].stop_reason, StopReason::Cancelled);
    assert_eq!(finished[&ids[2]].stop_reason, StopReason::Cancelled);
    assert!(
        finished[&ids[2]].generated_tokens.is_empty(),
        "cancelled while waiting"
    );
    let g = &finished[&ids[1]];
    assert_eq!(g.stop_reason, StopReason::MaxTokens);
    assert_eq!(
        g.generated_tokens,
        single(&model, &ps[1], &greedy(15)).generated_tokens
    );
    assert_eq!(engine.pages().map(|(f, t)| f == t), Some(true));
}

#[test]
fn engine_options_out_of_range_are_one_line_errors() {
    let model = load("tiny-q8_0-opts", tiny_model(GgmlType::Q8_0, 2));
    for opts in [
        EngineOptions {
            max_seqs: 0,
            ..Default::default()
        },
        EngineOptions {
            seq_ctx: 0,
            ..Default::default()
        },
        EngineOptions {
            max_seqs: 8,
            step_tokens: 4,
            seq_ctx: 64,
            pool_tokens: None,
        },
    ] {
        let Err(err) = Engine::new(model.clone(), BackendKind::Cpu, opts) else {
            panic!("accepted");
        };
        assert!(!err.to_string().contains('\n'), "{err}");
    }
}

#[test]
fn real_model_batched_greedy_agrees_with_references() {
    let Some(path) = real_model() else {
        skip_or_fail("real model", FETCH_SMOLLM2);
        return;
    };
    let model = Model::load(path).unwrap();
    let cases = greedy_refs(&refs_file("smollm2-greedy.json")).unwrap();
    let mut engine = Engine::new(
        model.clone(),
        BackendKind::Cpu,
        EngineOptions {
            max_seqs: 4,
            seq_ctx: 256,
            pool_tokens: None,
            step_tokens: 24,
        },
    )
    .unwrap();
    // Different max-tokens per case, so sequences leave at different steps.
    let reqs = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let n = c.exact_f32.generated_ids.len() - (i % 3);
            Request::new(c.prompt_ids.clone(), greedy(n))
        })
        .collect();
    let (gens, _) = run_all(&mut engine, reqs);
    for (case, g) in cases.iter().zip(&gens) {
        let mut exact = case.exact_f32.clone();
        exact.generated_ids.truncate(g.generated_tokens.len());
        let mut llama = case.llama_cpp.clone();
        llama.generated_ids.truncate(g.generated_tokens.len());
        let vs_exact = agrees_with(&g.generated_tokens, &exact, 0.5);
        let vs_llama = agrees_with(&g.generated_tokens, &llama, 0.5);
        assert!(
            vs_exact.is_ok() || vs_llama.is_ok(),
            "{:?}: {vs_exact:?} / {vs_llama:?}",
            case.prompt
        );
    }
}

/// A backend that holds one sequence at a time (no paged KV), as a library user's own may:
/// the CPU backend with its page support hidden.
struct OneAtATime(Box<dyn rocforge_runtime::Backend>);

impl rocforge_runtime::Backend for OneAtATime {
    fn kind(&self) -> BackendKind {
        self.0.kind()
    }
    fn device_name(&self) -> String {
        self.0.device_name()
    }
    fn capacity(&self) -> usize {
        self.0.capacity()
    }
    fn max_batch(&self) -> usize {
        self.0.max_batch()
    }
    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        all_logits: bool,
    ) -> rocforge_runtime::Result<()> {
        self.0.forward(tokens, pos, all_logits)
    }
    fn logits(&mut self) -> rocforge_runtime::Result<&[f32]> {
        self.0.logits()
    }
    fn argmax(&mut self) -> rocforge_runtime::Result<u32> {
        self.0.argmax()
    }
    fn memory(&self) -> rocforge_runtime::MemoryUsage {
        self.0.memory()
    }
}

#[test]
fn a_backend_without_pages_runs_the_requests_one_at_a_time() {
    let model = load("tiny-q4_0-serial", tiny_model(GgmlType::Q4_0, 6));
    let opts = BackendOptions {
        ctx: 64,
        max_batch: 16,
    };
    let inner = backend::create(BackendKind::Cpu, model.clone(), &opts).unwrap();
    let mut engine = Engine::with_backend(
        model.clone(),
        Box::new(OneAtATime(inner)),
        EngineOptions {
            max_seqs: 4,
            seq_ctx: 256,
            pool_tokens: None,
            step_tokens: 16,
        },
    )
    .unwrap();
    assert_eq!(engine.parallel(), 1);
    assert_eq!(engine.pages(), None);
    let ps = prompts(model.config.n_vocab, &[5, 30, 12]);
    // The backend holds 64 positions: a longer prompt is refused, not a crash.
    let long = prompts(model.config.n_vocab, &[65]).remove(0);
    assert!(matches!(
        engine.add(Request::new(long, greedy(1))),
        Err(Error::ContextFull { capacity: 64, .. })
    ));
    let reqs = ps
        .iter()
        .map(|p| Request::new(p.clone(), greedy(10)))
        .collect();
    let (gens, most) = run_all(&mut engine, reqs);
    assert_eq!(most, 1);
    for (p, g) in ps.iter().zip(&gens) {
        assert_eq!(
            g.generated_tokens,
            single(&model, p, &greedy(10)).generated_tokens
        );
    }
    // A sequence that reaches the backend's capacity stops there.
    let p = prompts(model.config.n_vocab, &[60]).remove(0);
    let (gens, _) = run_all(&mut engine, vec![Request::new(p, greedy(100))]);
    assert_eq!(gens[0].stop_reason, StopReason::ContextFull);
    assert_eq!(gens[0].generated_tokens.len(), 5);
}

#[test]
fn requests_added_between_steps_join_the_running_ones() {
    let model = load("tiny-q4_k-join", tiny_model(GgmlType::Q4K, 8));
    let mut engine = Engine::new(
        model.clone(),
        BackendKind::Cpu,
        EngineOptions {
            max_seqs: 4,
            seq_ctx: 128,
            pool_tokens: None,
            step_tokens: 12,
        },
    )
    .unwrap();
    let ps = prompts(model.config.n_vocab, &[9, 25, 4, 31]);
    let mut ids = Vec::new();
    let mut out: HashMap<u64, Generation> = HashMap::new();
    let collect = |events: Vec<Event>, out: &mut HashMap<u64, Generation>| {
        for e in events {
            if let Event::Finished { id, generation } = e {
                out.insert(id, generation);
            }
        }
    };
    for p in &ps[..2] {
        ids.push(engine.add(Request::new(p.clone(), greedy(20))).unwrap());
    }
    for _ in 0..6 {
        let events = engine.step().unwrap();
        collect(events, &mut out);
    }
    // The first two are decoding now; two more join with prompts that take several steps.
    assert_eq!(engine.running(), 2);
    for p in &ps[2..] {
        ids.push(engine.add(Request::new(p.clone(), greedy(20))).unwrap());
    }
    let events = engine.step().unwrap();
    assert!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Token { .. }))
            .count()
            >= 2,
        "the running sequences still decode in the step the new ones join"
    );
    collect(events, &mut out);
    while !engine.is_idle() {
        let events = engine.step().unwrap();
        collect(events, &mut out);
    }
    for (id, p) in ids.iter().zip(&ps) {
        assert_eq!(
            out[id].generated_tokens,
            single(&model, p, &greedy(20)).generated_tokens,
            "prompt of {}",
            p.len()
        );
    }
}
