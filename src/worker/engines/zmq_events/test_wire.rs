//! Test helpers: a small msgpack writer and an encoder of [`EngineEvent`] batches in every form
//! the decoder accepts (tagged maps or tagged arrays, signed or unsigned hashes, 2- or
//! 3-element batches, with or without unknown events, keys and positions).

use super::decode::{EngineEvent, Medium};

pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// Appends msgpack values (the smallest encoding of each, as msgspec writes them).
#[derive(Default)]
pub struct Msgpack(pub Vec<u8>);

impl Msgpack {
    fn len_marker(&mut self, n: usize, fix: u8, fix_max: usize, m16: u8, m32: u8) -> &mut Self {
        if n <= fix_max {
            self.0.push(fix | n as u8);
        } else if n <= u16::MAX as usize {
            self.0.push(m16);
            self.0.extend((n as u16).to_be_bytes());
        } else {
            self.0.push(m32);
            self.0.extend((n as u32).to_be_bytes());
        }
        self
    }
    pub fn arr(&mut self, n: usize) -> &mut Self {
        self.len_marker(n, 0x90, 15, 0xdc, 0xdd)
    }
    pub fn map(&mut self, n: usize) -> &mut Self {
        self.len_marker(n, 0x80, 15, 0xde, 0xdf)
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        if s.len() < 32 {
            self.0.push(0xa0 | s.len() as u8);
        } else {
            self.0.push(0xd9);
            self.0.push(s.len() as u8);
        }
        self.0.extend(s.as_bytes());
        self
    }
    pub fn bin(&mut self, b: &[u8]) -> &mut Self {
        self.0.push(0xc4);
        self.0.push(b.len() as u8);
        self.0.extend(b);
        self
    }
    pub fn nil(&mut self) -> &mut Self {
        self.0.push(0xc0);
        self
    }
    pub fn f64(&mut self, x: f64) -> &mut Self {
        self.0.push(0xcb);
        self.0.extend(x.to_be_bytes());
        self
    }
    pub fn uint(&mut self, v: u64) -> &mut Self {
        match v {
            0..=0x7f => self.0.push(v as u8),
            0x80..=0xff => self.0.extend([0xcc, v as u8]),
            0x100..=0xffff => {
                self.0.push(0xcd);
                self.0.extend((v as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.0.push(0xce);
                self.0.extend((v as u32).to_be_bytes());
            }
            _ => {
                self.0.push(0xcf);
                self.0.extend(v.to_be_bytes());
            }
        }
        self
    }
    pub fn int(&mut self, v: i64) -> &mut Self {
        match v {
            0.. => return self.uint(v as u64),
            -32..=-1 => self.0.push(v as i8 as u8),
            -128..=-33 => self.0.extend([0xd0, v as i8 as u8]),
            -32768..=-129 => {
                self.0.push(0xd1);
                self.0.extend((v as i16).to_be_bytes());
            }
            -2147483648..=-32769 => {
                self.0.push(0xd2);
                self.0.extend((v as i32).to_be_bytes());
            }
            _ => {
                self.0.push(0xd3);
                self.0.extend(v.to_be_bytes());
            }
        }
        self
    }
}

/// One way of writing a batch.
#[derive(Debug, Clone, Copy)]
pub struct Encoding {
    /// Tagged arrays (old releases) instead of tagged maps (current ones).
    pub arrays: bool,
    /// Hashes as signed int64 (SGLang) instead of unsigned (vLLM).
    pub signed: bool,
    /// A 3-element batch naming rank 3, else a 2-element one.
    pub rank: bool,
    /// An unknown event first, unknown keys / extra positions in every event.
    pub noise: bool,
}

impl Encoding {
    pub const ALL: [Encoding; 4] = [
        Encoding { arrays: false, signed: false, rank: true, noise: true },
        Encoding { arrays: true, signed: true, rank: false, noise: true },
        Encoding { arrays: false, signed: true, rank: false, noise: false },
        Encoding { arrays: true, signed: false, rank: true, noise: false },
    ];

    fn hash(self, w: &mut Msgpack, h: u64) {
        if self.signed {
            w.int(h as i64);
        } else {
            w.uint(h);
        }
    }

    fn hashes(self, w: &mut Msgpack, hs: &[u64]) {
        w.arr(hs.len());
        hs.iter().for_each(|&h| self.hash(w, h));
    }
}

fn opt_str(w: &mut Msgpack, s: Option<&str>) {
    match s {
        Some(s) => w.str(s),
        None => w.nil(),
    };
}

fn medium_str(m: &Option<Medium>) -> Option<&str> {
    m.as_ref().map(|m| match m {
        Medium::Gpu => "GPU",
        Medium::Other(s) => s.as_str(),
    })
}

/// `events` as one msgpack batch payload.
pub fn encode_batch(events: &[EngineEvent], enc: Encoding) -> Vec<u8> {
    let mut w = Msgpack::default();
    w.arr(if enc.rank { 3 } else { 2 }).f64(1.5).arr(events.len() + enc.noise as usize);
    if enc.noise {
        if enc.arrays {
            w.arr(3).str("BlockFrobnicated").uint(1).arr(1).uint(2);
        } else {
            w.map(2).str("type").str("BlockFrobnicated").str("block_hashes").arr(1).str("x");
        }
    }
    for e in events {
        if enc.arrays {
            event_array(&mut w, e, enc);
        } else {
            event_map(&mut w, e, enc);
        }
    }
    if enc.rank {
        w.uint(3);
    }
    w.0
}

fn event_map(w: &mut Msgpack, e: &EngineEvent, enc: Encoding) {
    let extra = enc.noise as usize;
    match e {
        EngineEvent::Stored { block_hashes, parent, token_ids, bigram, block_size, lora_name, medium, group_idx } => {
            assert!(!bigram, "the encoder writes plain token ids only");
            let optional = medium.is_some() as usize + lora_name.is_some() as usize;
            w.map(7 + optional + extra).str("type").str("BlockStored");
            w.str("block_hashes");
            enc.hashes(w, block_hashes);
            w.str("parent_block_hash");
            match parent {
                Some(p) => enc.hash(w, *p),
                None => {
                    w.nil();
                }
            }
            w.str("token_ids").arr(token_ids.len());
            token_ids.iter().for_each(|&t| {
                w.uint(t as u64);
            });
            w.str("block_size").uint(*block_size as u64).str("lora_id").nil();
            if enc.noise {
                w.str("extra_keys").arr(1).arr(2).str("mm").int(-1);
            }
            if let Some(m) = medium_str(medium) {
                w.str("medium").str(m);
            }
            if let Some(l) = lora_name {
                w.str("lora_name").str(l);
            }
            w.str("group_idx").uint(*group_idx as u64);
        }
        EngineEvent::Removed { block_hashes, medium, group_idx } => {
            w.map(3 + medium.is_some() as usize + extra).str("type").str("BlockRemoved").str("block_hashes");
            enc.hashes(w, block_hashes);
            if let Some(m) = medium_str(medium) {
                w.str("medium").str(m);
            }
            if enc.noise {
                w.str("locality").str("LOCAL");
            }
            w.str("group_idx").uint(*group_idx as u64);
        }
        EngineEvent::Cleared => {
            w.map(1 + extra).str("type").str("AllBlocksCleared");
            if enc.noise {
                w.str("why").map(0);
            }
        }
    }
}

fn event_array(w: &mut Msgpack, e: &EngineEvent, enc: Encoding) {
    let extra = enc.noise as usize;
    match e {
        EngineEvent::Stored { block_hashes, parent, token_ids, bigram, block_size, lora_name, medium, group_idx } => {
            assert!(!bigram, "the encoder writes plain token ids only");
            w.arr(10 + extra).str("BlockStored");
            enc.hashes(w, block_hashes);
            match parent {
                Some(p) => enc.hash(w, *p),
                None => {
                    w.nil();
                }
            }
            w.arr(token_ids.len());
            token_ids.iter().for_each(|&t| {
                w.uint(t as u64);
            });
            w.uint(*block_size as u64).nil();
            opt_str(w, medium_str(medium));
            opt_str(w, lora_name.as_deref());
            w.nil().uint(*group_idx as u64);
            if enc.noise {
                w.str("full_attention");
            }
        }
        EngineEvent::Removed { block_hashes, medium, group_idx } => {
            w.arr(4 + extra).str("BlockRemoved");
            enc.hashes(w, block_hashes);
            opt_str(w, medium_str(medium));
            w.uint(*group_idx as u64);
            if enc.noise {
                w.arr(0);
            }
        }
        EngineEvent::Cleared => {
            w.arr(1 + extra).str("AllBlocksCleared");
            if enc.noise {
                w.nil();
            }
        }
    }
}
