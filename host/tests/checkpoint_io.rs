//! Checkpoint I/O against the mergekit fixture zoo and against deliberately broken files.
//!
//! Expected names, shapes, dtypes and values come from the `safetensors` crate reading the same
//! files independently (bf16 -> f32 computed by hand as a 16-bit shift).
//!
//! Everything sits in `mod checkpoint` so that `cargo test -p modelglue-host checkpoint` runs it.

mod checkpoint {
    use std::collections::{BTreeMap, HashMap};
    use std::path::{Path, PathBuf};

    use modelglue::checkpoint::{
        dtype_name, parse_dtype, Checkpoint, CheckpointError, CheckpointWriter, DType, OutTensor,
    };

    fn zoo(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/mergekit/zoo")
            .join(name)
    }

    fn st_dtype(d: safetensors::Dtype) -> DType {
        match d {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            other => panic!("fixture dtype {other:?} not expected"),
        }
    }

    fn safetensors_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("list fixture dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        files
    }

    /// (name -> (dtype, shape, file, data)) and the names in file/offset order, read with the
    /// `safetensors` crate.
    #[allow(clippy::type_complexity)]
    fn reference(
        dir: &Path,
    ) -> (
        HashMap<String, (DType, Vec<usize>, PathBuf, Vec<u8>)>,
        Vec<String>,
    ) {
        let mut map = HashMap::new();
        let mut order = Vec::new();
        for file in safetensors_files(dir) {
            let bytes = std::fs::read(&file).expect("read fixture");
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("metadata");
            order.extend(meta.offset_keys());
            let st = safetensors::SafeTensors::deserialize(&bytes).expect("fixture parses");
            for (name, view) in st.tensors() {
                let old = map.insert(
                    name,
                    (
                        st_dtype(view.dtype()),
                        view.shape().to_vec(),
                        file.clone(),
                        view.data().to_vec(),
                    ),
                );
                assert!(old.is_none(), "fixture has a duplicate tensor");
            }
        }
        (map, order)
    }

    #[test]
    fn fixtures_open_with_the_names_shapes_dtypes_and_order_of_their_headers() {
        for model in ["base", "ft2", "ft3_bf16"] {
            let dir = zoo(model);
            let ckpt = Checkpoint::open(&dir).expect("fixture opens");
            let (reference, order) = reference(&dir);
            assert_eq!(ckpt.tensor_names(), order, "{model}: file order");
            assert_eq!(ckpt.len(), reference.len());
            for (name, (dtype, shape, file, data)) in &reference {
                let info = ckpt.info(name).expect("tensor present");
                assert_eq!(&info.name, name);
                assert_eq!(info.dtype, *dtype, "{model} {name}");
                assert_eq!(&info.shape, shape, "{model} {name}");
                assert_eq!(&info.file, file, "{model} {name}");
                assert_eq!(ckpt.raw_bytes(name).expect("bytes"), data.as_slice());
            }
            assert_eq!(ckpt.architectures(), ["LlamaForCausalLM"]);
            assert_eq!(ckpt.num_hidden_layers(), Some(2));
            assert_eq!(ckpt.config()["hidden_size"], 64);
        }
        let ft2 = Checkpoint::open(&zoo("ft2")).expect("ft2 opens");
        assert_eq!(ft2.weight_files().len(), 2);
        let ft3 = Checkpoint::open(&zoo("ft3_bf16")).expect("ft3_bf16 opens");
        assert!(ft3
            .info("model.norm.weight")
            .is_some_and(|i| i.dtype == DType::BF16));
    }

    #[test]
    fn load_returns_stored_values_and_load_as_converts_bf16_exactly() {
        let dir = zoo("ft3_bf16");
        let ckpt = Checkpoint::open(&dir).expect("opens");
        let (reference, _) = reference(&dir);
        for (name, (_, shape, _, data)) in &reference {
            let stored = ckpt.load(name).expect("load");
            assert_eq!(stored.dtype(), DType::BF16);
            assert_eq!(stored.dims(), shape.as_slice());
            let bits: Vec<u16> = stored
                .flatten_all()
                .and_then(|t| t.to_vec1::<half::bf16>())
                .expect("bf16 values")
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let want_bits: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            assert_eq!(bits, want_bits, "{name}");

            let f32s = ckpt.load_as(name, DType::F32).expect("load_as f32");
            assert_eq!(f32s.dtype(), DType::F32);
            assert_eq!(f32s.dims(), shape.as_slice());
            let got: Vec<u32> = f32s
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("f32 values")
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let want: Vec<u32> = want_bits.iter().map(|&b| u32::from(b) << 16).collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn load_as_f32_to_bf16_matches_the_bf16_fixture_of_the_same_model() {
        // ft3_bf16 is ft3 saved by torch with `.to(torch.bfloat16)`, so our rounding must give the
        // same bits (see the fixture MANIFEST).
        let f32_ckpt = Checkpoint::open(&zoo("ft3")).expect("ft3 opens");
        let bf16_ckpt = Checkpoint::open(&zoo("ft3_bf16")).expect("ft3_bf16 opens");
        for name in bf16_ckpt.tensor_names() {
            let ours = f32_ckpt.load_as(&name, DType::BF16).expect("convert");
            let ours = ours
                .flatten_all()
                .and_then(|t| t.to_vec1::<half::bf16>())
                .expect("values");
            let ours: Vec<u8> = ours.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
            assert_eq!(ours, bf16_ckpt.raw_bytes(&name).expect("bytes"), "{name}");
        }
    }

    #[test]
    fn side_files_lists_the_tokenizer_and_generation_files_present() {
        let ckpt = Checkpoint::open(&zoo("base")).expect("opens");
        let names: Vec<String> = ckpt
            .side_files()
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "tokenizer.json",
                "tokenizer_config.json",
                "generation_config.json"
            ]
        );
    }

    #[test]
    fn unknown_tensor_is_an_error_naming_it() {
        let ckpt = Checkpoint::open(&zoo("base")).expect("opens");
        let err = ckpt.load("model.layers.9.nope").expect_err("absent");
        assert!(matches!(err, CheckpointError::TensorNotFound { .. }));
        assert!(err.to_string().contains("model.layers.9.nope"));
        assert!(ckpt.raw_bytes("nope").is_err());
    }

    fn plan_of(ckpt: &Checkpoint) -> Vec<OutTensor> {
        ckpt.tensor_names()
            .iter()
            .map(|n| {
                let i = ckpt.info(n).expect("listed tensor has info");
                OutTensor {
                    name: n.clone(),
                    dtype: i.dtype,
                    shape: i.shape.clone(),
                }
            })
            .collect()
    }

    #[test]
    fn round_trip_through_three_shards_is_byte_exact() {
        let src = Checkpoint::open(&zoo("ft2")).expect("opens");
        let plan = plan_of(&src);
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("merged");
        let writer = CheckpointWriter::create(&target, &plan, 400_000, false).expect("create");
        assert_eq!(
            writer.shard_names(),
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors"
            ]
        );
        assert!(!target.exists(), "nothing at the target before finish");

        // Many threads, reverse order, both write paths.
        std::thread::scope(|s| {
            for (i, t) in plan.iter().enumerate().rev() {
                let (writer, src) = (&writer, &src);
                s.spawn(move || {
                    if i % 2 == 0 {
                        let tensor = src.load(&t.name).expect("load");
                        writer.write_tensor(&t.name, &tensor).expect("write_tensor");
                    } else {
                        writer
                            .write_raw(&t.name, src.raw_bytes(&t.name).expect("bytes"))
                            .expect("write_raw");
                    }
                });
            }
        });
        for side in src.side_files() {
            let name = side.file_name().expect("name").to_string_lossy().into_owned();
            writer.copy_file(&side, &name).expect("copy");
        }
        writer
            .write_file(
                "config.json",
                &std::fs::read(src.dir().join("config.json")).expect("cfg"),
            )
            .expect("config");
        writer.write_file("README.md", b"# merged\n").expect("readme");
        let out = writer.finish().expect("finish");
        assert_eq!(out, target);

        let back = Checkpoint::open(&target).expect("reopens");
        assert_eq!(back.weight_files().len(), 3);
        assert_eq!(back.tensor_names(), src.tensor_names(), "plan order kept");
        for name in src.tensor_names() {
            assert_eq!(
                back.info(&name).map(|i| (i.dtype, &i.shape)),
                src.info(&name).map(|i| (i.dtype, &i.shape))
            );
            assert_eq!(
                back.raw_bytes(&name).expect("out"),
                src.raw_bytes(&name).expect("in"),
                "{name}"
            );
        }
        assert_eq!(back.config(), src.config());
        assert_eq!(back.side_files().len(), src.side_files().len());
        assert_eq!(
            std::fs::read(target.join("README.md")).expect("readme"),
            b"# merged\n"
        );

        // The index, as transformers writes it.
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(target.join("model.safetensors.index.json")).expect("index"),
        )
        .expect("index is JSON");
        let total: usize = plan.iter().map(|t| t.shape.iter().product::<usize>() * 4).sum();
        assert_eq!(index["metadata"]["total_size"], total);
        let weight_map: BTreeMap<String, String> =
            serde_json::from_value(index["weight_map"].clone()).expect("weight_map");
        assert_eq!(weight_map.len(), plan.len());
        assert_eq!(weight_map["lm_head.weight"], "model-00003-of-00003.safetensors");

        // Every shard is valid for the reference parser, with the `pt` format tag.
        for file in safetensors_files(&target) {
            let bytes = std::fs::read(&file).expect("shard");
            let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("valid shard");
            assert_eq!((8 + n) % 8, 0, "data section aligned to 8");
            assert_eq!(
                meta.metadata()
                    .as_ref()
                    .and_then(|m| m.get("format"))
                    .map(String::as_str),
                Some("pt")
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers, ["merged"], "no partial or old directories left");
    }

    #[test]
    fn one_shard_is_model_safetensors_without_index_and_converted_tensors_write() {
        let src = Checkpoint::open(&zoo("base")).expect("opens");
        let plan: Vec<OutTensor> = plan_of(&src)
            .into_iter()
            .map(|t| OutTensor {
                dtype: DType::BF16,
                ..t
            })
            .collect();
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("nested/out");
        let writer = CheckpointWriter::create(&target, &plan, u64::MAX, false).expect("create");
        for t in &plan {
            // A transposed-back view exercises the non-contiguous path.
            let tensor = src.load_as(&t.name, DType::BF16).expect("convert");
            let tensor = if tensor.rank() == 2 {
                tensor.t().and_then(|x| x.t()).expect("view")
            } else {
                tensor
            };
            writer.write_tensor(&t.name, &tensor).expect("write");
        }
        writer.finish().expect("finish");
        assert!(target.join("model.safetensors").is_file());
        assert!(!target.join("model.safetensors.index.json").exists());
        let back = Checkpoint::open(&target);
        // No config.json was written: reopening says so.
        assert!(matches!(back, Err(CheckpointError::ConfigMissing { .. })));
        std::fs::write(target.join("config.json"), "{}").expect("config");
        let back = Checkpoint::open(&target).expect("reopens");
        for t in &plan {
            let want = src.load_as(&t.name, DType::BF16).expect("convert");
            let want: Vec<u16> = want
                .flatten_all()
                .and_then(|x| x.to_vec1::<half::bf16>())
                .expect("values")
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let got: Vec<u16> = back
                .raw_bytes(&t.name)
                .expect("bytes")
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            assert_eq!(got, want, "{}", t.name);
        }
    }

    fn partial_dirs(parent: &Path) -> Vec<String> {
        std::fs::read_dir(parent)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("mglue-partial"))
            .collect()
    }

    fn tiny_plan() -> Vec<OutTensor> {
        vec![
            OutTensor {
                name: "a".into(),
                dtype: DType::F32,
                shape: vec![2, 2],
            },
            OutTensor {
                name: "b".into(),
                dtype: DType::F16,
                shape: vec![3],
            },
        ]
    }

    #[test]
    fn dropping_an_unfinished_writer_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("out");
        let writer = CheckpointWriter::create(&target, &tiny_plan(), 1 << 20, false).expect("create");
        writer.write_raw("a", &[0u8; 16]).expect("write");
        assert!(writer.partial_dir().is_dir());
        assert_eq!(partial_dirs(tmp.path()).len(), 1);
        drop(writer);
        assert!(!target.exists());
        assert!(partial_dirs(tmp.path()).is_empty());
    }

    #[test]
    fn finish_with_missing_tensors_fails_and_leaves_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("out");
        let writer = CheckpointWriter::create(&target, &tiny_plan(), 1 << 20, false).expect("create");
        writer.write_raw("a", &[0u8; 16]).expect("write");
        let err = writer.finish().expect_err("b missing");
        assert!(matches!(&err, CheckpointError::Incomplete { missing, .. } if missing == &["b"]));
        assert!(err.to_string().contains("`b`"), "{err}");
        assert!(!target.exists());
        assert!(partial_dirs(tmp.path()).is_empty());
    }

    #[test]
    fn existing_target_is_refused_without_overwrite_and_replaced_at_finish_with_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("out");
        std::fs::create_dir(&target).expect("mkdir");
        std::fs::write(target.join("old.txt"), "old").expect("marker");

        let err = CheckpointWriter::create(&target, &tiny_plan(), 1 << 20, false).expect_err("exists");
        assert!(matches!(err, CheckpointError::TargetExists { .. }));
        assert!(err.to_string().contains(&target.display().to_string()), "{err}");

        let writer = CheckpointWriter::create(&target, &tiny_plan(), 1 << 20, true).expect("create");
        writer.write_raw("a", &[0u8; 16]).expect("a");
        writer.write_raw("b", &[0u8; 6]).expect("b");
        assert!(
            target.join("old.txt").exists(),
            "old checkpoint kept until finish"
        );
        writer.finish().expect("finish");
        assert!(!target.join("old.txt").exists());
        assert!(target.join("model.safetensors").is_file());
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names, ["out"]);
    }

    #[test]
    fn stale_partial_of_a_dead_process_is_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Above Linux's pid_max (2^22), so never a live process.
        let stale = tmp.path().join(".out.mglue-partial-999999999");
        std::fs::create_dir(&stale).expect("mkdir");
        std::fs::write(stale.join("model.safetensors"), "junk").expect("junk");
        let writer =
            CheckpointWriter::create(&tmp.path().join("out"), &tiny_plan(), 1 << 20, false).expect("create");
        assert!(!stale.exists());
        // A second writer for the same target in the same process is refused.
        let err = CheckpointWriter::create(&tmp.path().join("out"), &tiny_plan(), 1 << 20, false)
            .expect_err("busy");
        assert!(matches!(err, CheckpointError::PartialInUse { .. }), "{err}");
        drop(writer);
    }

    #[test]
    fn writer_rejects_what_does_not_match_the_plan() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("out");
        let dup = vec![tiny_plan()[0].clone(), tiny_plan()[0].clone()];
        assert!(matches!(
            CheckpointWriter::create(&target, &dup, 1 << 20, false),
            Err(CheckpointError::DuplicateInPlan { .. })
        ));

        let huge = vec![OutTensor {
            name: "h".into(),
            dtype: DType::F32,
            shape: vec![usize::MAX, 2],
        }];
        assert!(matches!(
            CheckpointWriter::create(&target, &huge, 1 << 20, false),
            Err(CheckpointError::PlanShapeOverflow { .. })
        ));
        assert!(!target.exists() && partial_dirs(tmp.path()).is_empty());

        let writer = CheckpointWriter::create(&target, &tiny_plan(), 1 << 20, false).expect("create");
        let cpu = &candle_core::Device::Cpu;
        let f32s = candle_core::Tensor::zeros((2, 2), DType::F32, cpu).expect("t");
        let err = writer.write_tensor("c", &f32s).expect_err("not planned");
        assert!(matches!(err, CheckpointError::NotInPlan { .. }) && err.to_string().contains("`c`"));
        let err = writer.write_tensor("b", &f32s).expect_err("dtype");
        assert!(matches!(err, CheckpointError::DtypeMismatch { .. }), "{err}");
        let wrong_shape = candle_core::Tensor::zeros(4, DType::F32, cpu).expect("t");
        let err = writer.write_tensor("a", &wrong_shape).expect_err("shape");
        assert!(matches!(err, CheckpointError::ShapeMismatch { .. }), "{err}");
        let err = writer.write_raw("a", &[0u8; 15]).expect_err("length");
        assert!(matches!(
            err,
            CheckpointError::ByteLengthMismatch {
                expected: 16,
                actual: 15,
                ..
            }
        ));
        writer.write_tensor("a", &f32s).expect("first write");
        let err = writer.write_tensor("a", &f32s).expect_err("twice");
        assert!(matches!(err, CheckpointError::AlreadyWritten { .. }), "{err}");
        for bad in ["../escape", "/abs", "model.safetensors"] {
            let err = writer.write_file(bad, b"x").expect_err(bad);
            assert!(
                matches!(err, CheckpointError::InvalidFileName { .. }),
                "{bad}: {err}"
            );
        }
    }

    // ---- broken inputs -------------------------------------------------------------------------

    /// A model dir with a valid config.json and one weights file `name` holding `bytes`.
    fn broken_model(name: &str, bytes: &[u8]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            tmp.path().join("config.json"),
            r#"{"architectures":["LlamaForCausalLM"]}"#,
        )
        .expect("config");
        std::fs::write(tmp.path().join(name), bytes).expect("weights");
        tmp
    }

    fn safetensors_bytes(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + data_len, 0);
        out
    }

    fn open_err(dir: &Path) -> CheckpointError {
        match Checkpoint::open(dir) {
            Ok(_) => panic!("{} should not open", dir.display()),
            Err(e) => e,
        }
    }

    #[test]
    fn corrupted_safetensors_files_are_errors_naming_the_file() {
        let one = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut huge_len = (1u64 << 40).to_le_bytes().to_vec();
        huge_len.extend_from_slice(b"{}");
        let mut beyond = 4000u64.to_le_bytes().to_vec();
        beyond.extend_from_slice(b"{\"w\":{}}");
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("short.safetensors", vec![1, 2, 3], "truncated"),
            (
                "truncated.safetensors",
                safetensors_bytes(one, 8)[..30].to_vec(),
                "truncated",
            ),
            ("huge.safetensors", huge_len, "limit"),
            ("beyond.safetensors", beyond, "only"),
            ("json.safetensors", safetensors_bytes("{\"w\": [", 0), "JSON"),
            (
                "range.safetensors",
                safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#, 8),
                "8..16",
            ),
            (
                "overlap.safetensors",
                safetensors_bytes(
                    r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    12,
                ),
                "overlap",
            ),
            (
                "size.safetensors",
                safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8),
                "12 bytes",
            ),
            (
                "dtype.safetensors",
                safetensors_bytes(r#"{"w":{"dtype":"Q8_0","shape":[8],"data_offsets":[0,8]}}"#, 8),
                "Q8_0",
            ),
        ];
        for (name, bytes, needle) in cases {
            let tmp = broken_model(name, &bytes);
            let msg = open_err(tmp.path()).to_string();
            assert!(
                msg.contains(name),
                "{name}: message does not name the file: {msg}"
            );
            assert!(msg.contains(needle), "{name}: expected `{needle}` in: {msg}");
        }
    }

    #[test]
    fn pickle_checkpoints_are_refused_with_a_conversion_hint() {
        let tmp = broken_model("pytorch_model.bin", b"\x80\x02pickle");
        let err = open_err(tmp.path());
        assert!(matches!(err, CheckpointError::PickleRefused { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("pytorch_model.bin") && msg.contains("pickle"),
            "{msg}"
        );
        assert!(msg.contains("safe_serialization=True"), "{msg}");
    }

    #[test]
    fn safetensors_win_over_a_stray_bin_file() {
        let tmp = broken_model(
            "model.safetensors",
            &safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 8),
        );
        std::fs::write(tmp.path().join("training_args.bin"), b"pickle").expect("bin");
        let ckpt = Checkpoint::open(tmp.path()).expect("opens");
        assert_eq!(ckpt.tensor_names(), ["w"]);
    }

    #[test]
    fn config_problems_are_errors_naming_config_json() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = open_err(tmp.path());
        assert!(matches!(err, CheckpointError::ConfigMissing { .. }));
        assert!(err.to_string().contains("config.json"));

        std::fs::write(tmp.path().join("config.json"), "{\"a\": ").expect("config");
        let err = open_err(tmp.path());
        assert!(matches!(err, CheckpointError::ConfigInvalid { .. }), "{err}");
        assert!(err.to_string().contains("config.json"));

        std::fs::write(tmp.path().join("config.json"), "{}").expect("config");
        assert!(matches!(open_err(tmp.path()), CheckpointError::NoWeights { .. }));
    }

    fn indexed_model(weight_map: &str, shards: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("config.json"), "{}").expect("config");
        std::fs::write(
            tmp.path().join("model.safetensors.index.json"),
            format!(r#"{{"metadata":{{"total_size":16}},"weight_map":{weight_map}}}"#),
        )
        .expect("index");
        for (name, bytes) in shards {
            std::fs::write(tmp.path().join(name), bytes).expect("shard");
        }
        tmp
    }

    #[test]
    fn index_problems_are_errors() {
        let w = safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 8);
        let v = safetensors_bytes(r#"{"v":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 8);

        let tmp = indexed_model(
            r#"{"w":"a.safetensors","v":"b.safetensors"}"#,
            &[("a.safetensors", w.clone())],
        );
        let err = open_err(tmp.path());
        assert!(matches!(err, CheckpointError::IndexMissingShard { .. }), "{err}");
        assert!(err.to_string().contains("b.safetensors") && err.to_string().contains("`v`"));

        let tmp = indexed_model(
            r#"{"w":"a.safetensors","v":"b.safetensors"}"#,
            &[("a.safetensors", w.clone()), ("b.safetensors", w.clone())],
        );
        let err = open_err(tmp.path());
        assert!(matches!(err, CheckpointError::DuplicateTensor { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("a.safetensors") && msg.contains("b.safetensors") && msg.contains("`w`"),
            "{msg}"
        );

        let tmp = indexed_model(r#"{"w":"../a.safetensors"}"#, &[("a.safetensors", w.clone())]);
        assert!(matches!(
            open_err(tmp.path()),
            CheckpointError::IndexInvalid { .. }
        ));

        let tmp = indexed_model(
            r#"{"w":"a.safetensors","v":"a.safetensors"}"#,
            &[("a.safetensors", w.clone()), ("b.safetensors", v.clone())],
        );
        assert!(matches!(
            open_err(tmp.path()),
            CheckpointError::IndexTensorMissing { .. }
        ));

        let tmp = indexed_model(
            r#"{"w":"a.safetensors","v":"b.safetensors"}"#,
            &[("a.safetensors", w), ("b.safetensors", v)],
        );
        let ckpt = Checkpoint::open(tmp.path()).expect("valid index opens");
        assert_eq!(ckpt.tensor_names(), ["w", "v"]);
    }

    #[test]
    fn several_safetensors_without_index_are_ambiguous() {
        let w = safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 8);
        let tmp = broken_model("a.safetensors", &w);
        std::fs::write(tmp.path().join("b.safetensors"), &w).expect("second");
        let err = open_err(tmp.path());
        assert!(matches!(err, CheckpointError::AmbiguousWeights { .. }), "{err}");
    }

    #[test]
    fn config_sizes_are_checked_against_the_weights() {
        let header = r#"{"model.embed_tokens.weight":{"dtype":"U8","shape":[4,2],"data_offsets":[0,8]},"model.layers.0.w":{"dtype":"U8","shape":[1],"data_offsets":[8,9]},"model.layers.1.w":{"dtype":"U8","shape":[1],"data_offsets":[9,10]}}"#;
        let tmp = broken_model("model.safetensors", &safetensors_bytes(header, 10));
        let check = |config: &str| {
            std::fs::write(tmp.path().join("config.json"), config).expect("config");
            Checkpoint::open(tmp.path()).expect("opens").check_config_shapes()
        };
        check(r#"{"vocab_size":4,"hidden_size":2,"num_hidden_layers":2}"#).expect("consistent");
        check(r#"{"text_config":{"vocab_size":4}}"#).expect("nested and consistent");
        check(r#"{}"#).expect("nothing stated, nothing checked");
        // One multi-token-prediction block stored as layer 1.
        check(r#"{"num_hidden_layers":1,"num_nextn_predict_layers":1}"#).expect("MTP layer");
        for (config, key) in [
            (r#"{"vocab_size":5}"#, "`vocab_size` is 5"),
            (
                r#"{"text_config":{"hidden_size":3}}"#,
                "`text_config.hidden_size` is 3",
            ),
            (r#"{"num_hidden_layers":3}"#, "`num_hidden_layers` is 3"),
        ] {
            let err = check(config).expect_err(config);
            let msg = err.to_string();
            assert!(
                matches!(err, CheckpointError::ConfigShape { .. })
                    && msg.contains(key)
                    && msg.contains("config.json"),
                "{config}: {msg}"
            );
        }
    }

    #[test]
    fn dtype_names_follow_hugging_face() {
        assert_eq!(dtype_name(DType::BF16), "bfloat16");
        assert_eq!(dtype_name(DType::F32), "float32");
        assert_eq!(dtype_name(DType::F16), "float16");
        assert_eq!(parse_dtype("fp16"), Some(DType::F16));
        assert_eq!(parse_dtype("bfloat16"), Some(DType::BF16));
    }
}
