//! Differencing VDIs and VDIs in VirtualBox's layout.
//!
//! qemu cannot open differencing VDIs, so their content is checked against a flattened raw built
//! independently: [`flatten`] here reads the child's header and block map and takes free blocks
//! from the parent (which qemu-img converts to raw). VirtualBox-layout images (400-byte header,
//! Oracle banner, map and data 1 MiB aligned) are built by [`VboxImage`], byte by byte from the
//! format description, and read by vdisk and, when they are not differencing, by qemu-img too.

use std::path::Path;

use blockdev::options::CreateOptions;
use blockdev::{BlockDriver, OpenOptions};
use formats::Registry;
use proptest::prelude::*;
use vdisk_tests::model::{self, Op, Subject};
use vdisk_tests::{pseudo_random, qemu_img, s, tempdir, XorShift};

const MIB: usize = 1 << 20;
const FREE: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The guest content of the differencing VDI `child` over a parent whose guest content is
/// `parent`, decoded from the file: free blocks from the parent, zero blocks zeros, the others
/// from the data area. Also asserts the header links the child to the parent file's UUID.
fn flatten(child: &[u8], parent_file: &[u8], parent: &[u8]) -> Vec<u8> {
    assert_eq!(le32(child, 76), 4, "image type: differencing");
    assert_eq!(child[424..440], parent_file[392..408], "link UUID = the parent's create UUID");
    let (off_blocks, off_data) = (le32(child, 340) as usize, le32(child, 344) as usize);
    let size = u64::from_le_bytes(child[368..376].try_into().unwrap()) as usize;
    let (bs, extra, blocks) = (le32(child, 376) as usize, le32(child, 380) as usize, le32(child, 384) as usize);
    let mut out = vec![0u8; size];
    for b in 0..blocks {
        let range = b * bs..((b + 1) * bs).min(size);
        match le32(child, off_blocks + b * 4) {
            FREE => {
                for (i, x) in range.clone().zip(out[range.clone()].iter_mut()) {
                    *x = parent.get(i).copied().unwrap_or(0);
                }
            }
            ZERO => {}
            idx => {
                let at = off_data + idx as usize * (extra + bs) + extra;
                let n = range.len();
                let have = child.len().saturating_sub(at).min(n);
                out[range.start..range.start + have].copy_from_slice(&child[at..at + have]);
            }
        }
    }
    out
}

/// A VDI as VirtualBox lays it out, built independently of vdisk.
struct VboxImage {
    size: u64,
    /// Per guest block: `FREE`, `ZERO` or the index into `data`.
    map: Vec<u32>,
    /// The stored blocks, in data-area order.
    data: Vec<Vec<u8>>,
    create: [u8; 16],
    /// `Some((link, parent modify))` for a differencing image.
    parent: Option<([u8; 16], [u8; 16])>,
}

impl VboxImage {
    fn bytes(&self) -> Vec<u8> {
        let blocks = self.map.len();
        let off_blocks = MIB;
        let off_data = off_blocks + (blocks * 4).next_multiple_of(MIB);
        let mut f = vec![0u8; off_data];
        let text = b"<<< Oracle VM VirtualBox Disk Image >>>\n";
        f[..text.len()].copy_from_slice(text);
        let mut put = |at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(64, 0xBEDA_107F);
        put(68, 0x0001_0001);
        put(72, 400);
        put(76, if self.parent.is_some() { 4 } else { 1 });
        put(340, off_blocks as u32);
        put(344, off_data as u32);
        put(360, 512);
        put(376, MIB as u32);
        put(384, blocks as u32);
        put(388, self.data.len() as u32);
        // Logical geometry (cbHeader 400): cylinders, heads, sectors, sector size.
        put(456, (self.size / (16 * 63 * 512)) as u32);
        put(460, 16);
        put(464, 63);
        put(468, 512);
        f[368..376].copy_from_slice(&self.size.to_le_bytes());
        f[392..408].copy_from_slice(&self.create);
        f[408..424].copy_from_slice(&[0x5a; 16]);
        if let Some((link, modify)) = self.parent {
            f[424..440].copy_from_slice(&link);
            f[440..456].copy_from_slice(&modify);
        }
        for (b, e) in self.map.iter().enumerate() {
            f[off_blocks + b * 4..off_blocks + b * 4 + 4].copy_from_slice(&e.to_le_bytes());
        }
        for block in &self.data {
            f.extend_from_slice(block);
        }
        f
    }

    /// The guest content (free blocks from `parent`, or zeros).
    fn content(&self, parent: Option<&[u8]>) -> Vec<u8> {
        let size = self.size as usize;
        let mut out = vec![0u8; size];
        for (b, &e) in self.map.iter().enumerate() {
            let range = b * MIB..((b + 1) * MIB).min(size);
            match (e, parent) {
                (FREE, Some(p)) => out[range.clone()].copy_from_slice(&p[range]),
                (FREE | ZERO, _) => {}
                (i, _) => out[range.clone()].copy_from_slice(&self.data[i as usize][..range.len()]),
            }
        }
        out
    }

    /// Blocks in a shuffled data order, a third each free, zero and stored (pseudo-random).
    fn random(size: u64, seed: u64, create: [u8; 16], parent: Option<([u8; 16], [u8; 16])>) -> VboxImage {
        let blocks = (size as usize).div_ceil(MIB);
        let mut rng = XorShift::new(seed);
        let mut map = vec![FREE; blocks];
        let mut stored = Vec::new();
        for (b, e) in map.iter_mut().enumerate() {
            match rng.below(3) {
                0 => {}
                1 => *e = ZERO,
                _ => stored.push(b),
            }
        }
        // Data order differs from guest order, as after random guest writes.
        for i in (1..stored.len()).rev() {
            stored.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut data = Vec::new();
        for (i, &b) in stored.iter().enumerate() {
            map[b] = i as u32;
            data.push(pseudo_random(MIB, seed * 1000 + b as u64));
        }
        VboxImage { size, map, data, create, parent }
    }
}

fn open(reg: &Registry, path: &Path, opts: &OpenOptions) -> std::sync::Arc<dyn BlockDriver> {
    vdisk_tests::open_image(reg, path, Some("vdi"), opts).unwrap()
}

fn read_all(d: &std::sync::Arc<dyn BlockDriver>) -> Vec<u8> {
    let mut buf = vec![0u8; d.size() as usize];
    d.read_exact_at(0, &mut buf).unwrap();
    buf
}

/// A qemu-made VDI parent with pseudo-random content (one block of zeros); its content.
fn make_parent(dir: &Path, name: &str, size: usize, seed: u64) -> Vec<u8> {
    let mut bytes = pseudo_random(size, seed);
    bytes[MIB..2 * MIB].fill(0);
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, &bytes).unwrap();
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "vdi", s(&raw), s(&dir.join(name))]).ok();
    bytes
}

const SIZE: usize = 5 * MIB + 4096;

fn run_differencing(ops: &[Op]) -> Result<(), TestCaseError> {
    let d = tempdir();
    let reg = Registry::new();
    let parent = make_parent(d.path(), "parent.vdi", SIZE, 3);
    let img = d.path().join("child.vdi");
    let mut o = CreateOptions::new();
    o.set("backing_file", "parent.vdi");
    reg.create("vdi", s(&img), &o).unwrap();
    let open = || vdisk_tests::open_image(&reg, &img, Some("vdi"), &OpenOptions::read_write());
    let subject = Subject { open: &open, backing: Some(&parent) };
    let model = model::run(&subject, parent.clone(), ops).map_err(TestCaseError::fail)?;
    let flat = flatten(&std::fs::read(&img).unwrap(), &std::fs::read(d.path().join("parent.vdi")).unwrap(), &parent);
    prop_assert!(flat == model, "the child's file, decoded independently, differs from the model");
    // The parent is untouched and still what qemu reads.
    let m = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vdi",
        s(&d.path().join("parent.vdi.raw")),
        s(&d.path().join("parent.vdi")),
    ]);
    prop_assert_eq!(m.code, 0, "parent changed: {}{}", m.stdout, m.stderr);
    Ok(())
}

fn diff_ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![model::ops(SIZE as u64, 512, 2560 << 10), model::ops(SIZE as u64, 1, 4096)]
        .prop_filter("not resized", |op| !matches!(op, Op::Grow { .. }));
    prop::collection::vec(op, 1..30)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: model::cases(16), max_shrink_iters: 100, .. ProptestConfig::default() })]

    #[test]
    fn differencing_images_read_back_like_the_model_and_the_independent_decoder(ops in diff_ops()) {
        run_differencing(&ops)?;
    }
}

#[test]
fn virtualbox_layout_images_read_like_qemu_reads_them_and_take_writes() {
    let d = tempdir();
    let reg = Registry::new();
    for (seed, size) in [(1u64, 7 * MIB as u64 + 512), (2, 3 * MIB as u64)] {
        let img = d.path().join(format!("vbox{seed}.vdi"));
        let v = VboxImage::random(size, seed, [seed as u8; 16], None);
        std::fs::write(&img, v.bytes()).unwrap();
        let expected = v.content(None);
        assert!(read_all(&open(&reg, &img, &OpenOptions::default())) == expected, "vdisk reads {seed}");
        let raw = d.path().join(format!("vbox{seed}.raw"));
        std::fs::write(&raw, &expected).unwrap();
        let m = qemu_img(&["compare", "-f", "raw", "-F", "vdi", s(&raw), s(&img)]);
        assert_eq!(m.code, 0, "qemu-img compare: {}{}", m.stdout, m.stderr);
        // vdisk writes into the 1 MiB-aligned layout; qemu agrees afterwards.
        let ops = [
            Op::Write { off: 4096, len: 100_000, seed: 9 },
            Op::Write { off: size - 700, len: 700, seed: 10 },
            Op::Zero { off: 2 * MIB as u64 - 512, len: MIB as u64 + 1024, unmap: false },
        ];
        let opener = || vdisk_tests::open_image(&reg, &img, Some("vdi"), &OpenOptions::read_write());
        let model = model::run(&Subject { open: &opener, backing: None }, expected, &ops).unwrap();
        std::fs::write(&raw, &model).unwrap();
        let m = qemu_img(&["compare", "-f", "raw", "-F", "vdi", s(&raw), s(&img)]);
        assert_eq!(m.code, 0, "after writes, qemu-img compare: {}{}", m.stdout, m.stderr);
        let c = qemu_img(&["check", "-f", "vdi", s(&img)]);
        assert_eq!(c.code, 0, "qemu-img check: {}{}", c.stdout, c.stderr);
        let head = std::fs::read(&img).unwrap();
        assert_eq!((le32(&head, 72), le32(&head, 340)), (400, MIB as u32), "the layout stays VirtualBox's");
    }
}

/// Parent's create and modify UUIDs, from its file.
fn ids(path: &Path) -> ([u8; 16], [u8; 16]) {
    let h = std::fs::read(path).unwrap();
    (h[392..408].try_into().unwrap(), h[408..424].try_into().unwrap())
}

#[test]
fn virtualbox_snapshot_chains_find_their_parents_by_uuid() {
    // VM/base.vdi <- VM/Snapshots/{a}.vdi <- VM/Snapshots/{b}.vdi, as VirtualBox keeps them.
    let d = tempdir();
    let reg = Registry::new();
    let vm = d.path();
    std::fs::create_dir(vm.join("Snapshots")).unwrap();
    let size = 4 * MIB + 512;
    let base = make_parent(vm, "base.vdi", size, 7);
    // Decoys: a VDI with another UUID, and a non-VDI with the .vdi extension.
    make_parent(&vm.join("Snapshots"), "other.vdi", size, 8);
    std::fs::write(vm.join("Snapshots/junk.vdi"), b"not an image").unwrap();
    let a = VboxImage::random(size as u64, 11, [0xa1; 16], Some(ids(&vm.join("base.vdi"))));
    let a_path = vm.join("Snapshots/{aaaa}.vdi");
    std::fs::write(&a_path, a.bytes()).unwrap();
    let a_content = a.content(Some(&base));
    let b = VboxImage::random(size as u64, 12, [0xb2; 16], Some(([0xa1; 16], [0x5a; 16])));
    let b_path = vm.join("Snapshots/{bbbb}.vdi");
    std::fs::write(&b_path, b.bytes()).unwrap();
    let b_content = b.content(Some(&a_content));

    let top = open(&reg, &b_path, &OpenOptions::default());
    assert!(read_all(&top) == b_content, "the chain reads as parent plus children");
    let info = top.info().unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some("{aaaa}.vdi"));
    let mid = top.backing().expect("parent opened");
    assert_eq!(mid.info().unwrap().backing_filename.as_deref(), Some("../base.vdi"));
    assert!(read_all(&mid) == a_content);
    // Unallocated (free) blocks show as such, zero blocks as zeros.
    let first_free = b.map.iter().position(|&e| e == FREE).unwrap() as u64;
    let st = top.block_status(first_free * MIB as u64, MIB as u64).unwrap();
    assert_eq!(st.kind, blockdev::ExtentKind::Unallocated);
    if let Some(z) = b.map.iter().position(|&e| e == ZERO) {
        assert_eq!(top.block_status(z as u64 * MIB as u64, MIB as u64).unwrap().kind, blockdev::ExtentKind::Zero);
    }
    // Without the parent (moved away) the open fails and says what it looked for.
    std::fs::rename(vm.join("base.vdi"), vm.join("base.moved")).unwrap();
    let e = vdisk_tests::open_image(&reg, &a_path, Some("vdi"), &OpenOptions::default()).unwrap_err();
    let link = ids(&vm.join("base.moved")).0;
    let guid = format!(
        "{:08x}-{:04x}-{:04x}-{}",
        u32::from_le_bytes(link[0..4].try_into().unwrap()),
        u16::from_le_bytes(link[4..6].try_into().unwrap()),
        u16::from_le_bytes(link[6..8].try_into().unwrap()),
        link[8..10].iter().map(|x| format!("{x:02x}")).collect::<String>()
    );
    assert!(e.message().contains(&guid), "{} lacks {guid}", e.message());
    // ... unless it is named; a named file with another UUID is refused.
    let named = OpenOptions { parent_hint: Some(s(&vm.join("base.moved")).to_string()), ..OpenOptions::default() };
    assert!(read_all(&open(&reg, &a_path, &named)) == a_content);
    let wrong =
        OpenOptions { parent_hint: Some(s(&vm.join("Snapshots/other.vdi")).to_string()), ..OpenOptions::default() };
    let e = vdisk_tests::open_image(&reg, &a_path, Some("vdi"), &wrong).unwrap_err();
    assert!(e.message().contains("is not the parent"), "{}", e.message());
    // Untrusted opens do not look above the image's directory.
    std::fs::rename(vm.join("base.moved"), vm.join("base.vdi")).unwrap();
    let e = vdisk_tests::open_image(&reg, &a_path, Some("vdi"), &OpenOptions::untrusted()).unwrap_err();
    assert!(e.message().contains("no parent"), "{}", e.message());
}

#[test]
fn parent_loops_fail_cleanly() {
    let d = tempdir();
    let reg = Registry::new();
    // x links to y and y to x: the chain's loop detection stops it.
    let x = VboxImage::random(2 * MIB as u64, 21, [0x11; 16], Some(([0x22; 16], [0; 16])));
    let y = VboxImage::random(2 * MIB as u64, 22, [0x22; 16], Some(([0x11; 16], [0; 16])));
    std::fs::write(d.path().join("x.vdi"), x.bytes()).unwrap();
    std::fs::write(d.path().join("y.vdi"), y.bytes()).unwrap();
    assert!(vdisk_tests::open_image(&reg, &d.path().join("x.vdi"), Some("vdi"), &OpenOptions::default()).is_err());
    // An image linked to itself finds no parent (it is not its own candidate).
    let z = VboxImage::random(2 * MIB as u64, 23, [0x33; 16], Some(([0x33; 16], [0; 16])));
    std::fs::write(d.path().join("z.vdi"), z.bytes()).unwrap();
    let e = vdisk_tests::open_image(&reg, &d.path().join("z.vdi"), Some("vdi"), &OpenOptions::default()).unwrap_err();
    assert!(e.message().contains("no parent"), "{}", e.message());
}
