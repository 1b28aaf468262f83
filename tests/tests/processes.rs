//! Everyday tools on the mount: ls, cp -a in and out, mv, rm -r, cat and redirections,
//! tar both ways, git, find, du, df. Trees are compared with what was put in and with
//! what the export shows.

use std::fs;
use std::path::Path;
use std::process::Command;

use ferry_tests::tree::{self, Opts};
use ferry_tests::{fixture, fixture_with, run, sh, temp_dir};

/// Runs `program args…` (paths and strings mixed) with the default timeout.
fn exec(program: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> ferry_tests::Output {
    let mut c = Command::new(program);
    for a in args {
        c.arg(a.as_ref());
    }
    run(&mut c)
}

const PERM_MTIME: Opts = Opts {
    perm: true,
    nlink: false,
    mtime: true,
    owner: true,
};

#[test]
fn ls_shows_names_modes_and_sizes() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        tree::make_sample(e, 1).expect("sample tree");
    }) else {
        return;
    };
    let out = run(Command::new("ls")
        .args(["-lan", "--time-style=+%s"])
        .arg(fx.mount.path()));
    out.assert_success();
    let text = out.stdout_str();
    // mode nlink uid gid size time name [-> target]
    let line_of = |name: &str| {
        text.lines()
            .find(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 7 && (f[6..].join(" ") == name || f[6..].starts_with(&[name, "->"]))
            })
            .unwrap_or_else(|| panic!("`ls -l` does not show {name}:\n{text}"))
            .to_string()
    };
    for name in ["a.txt", "empty", "bin.dat", "sub", "emptydir"] {
        let line = line_of(name);
        let md = fs::symlink_metadata(fx.exp(name)).expect("export lstat");
        let fields: Vec<&str> = line.split_whitespace().collect();
        // mode nlink uid gid size time name
        assert_eq!(fields[2], "0", "uid of {name}: {line}");
        if md.is_file() {
            assert_eq!(fields[4], md.len().to_string(), "size of {name}: {line}");
            assert!(
                fields[0].starts_with("-rw-r--r--"),
                "mode of {name}: {line}"
            );
        } else {
            assert!(
                fields[0].starts_with('d'),
                "{name} is not a directory: {line}"
            );
        }
    }
    assert!(
        line_of("link").contains("link -> a.txt"),
        "symlink shown as {}",
        line_of("link")
    );
    let sub = run(Command::new("ls").arg("-la").arg(fx.mnt("sub/deeper")));
    sub.assert_success();
    assert!(sub.stdout_str().contains("-rw------- "), "{sub}");
    assert!(sub.stdout_str().contains("-rwxr-xr-x "), "{sub}");
    assert!(sub.stdout_str().contains("odd name with spaces"), "{sub}");
}

#[test]
fn cp_a_into_and_out_of_the_mount() {
    let Some(fx) = fixture() else { return };
    let local = temp_dir("local");
    let src = local.path().join("src");
    tree::make_sample(&src, 2).expect("sample tree");
    exec("cp", &[&"-a", &src, &fx.mnt("copy")]).assert_success();
    tree::assert_same(&src, &fx.exp("copy"), PERM_MTIME);
    tree::assert_same(&src, &fx.mnt("copy"), PERM_MTIME);
    let back = local.path().join("back");
    exec("cp", &[&"-a", &fx.mnt("copy"), &back]).assert_success();
    tree::assert_same(&src, &back, PERM_MTIME);
    // Plain recursive copy (new mtimes, default modes) within the mount.
    exec("cp", &[&"-r", &fx.mnt("copy"), &fx.mnt("copy2")]).assert_success();
    tree::assert_same(&src, &fx.exp("copy2"), Opts::CONTENT);
}

#[test]
fn mv_within_into_and_out_of_the_mount() {
    let Some(fx) = fixture() else { return };
    let local = temp_dir("local");
    tree::make_sample(&local.path().join("tree"), 3).expect("sample tree");
    let expected = tree::snapshot(&local.path().join("tree"), Opts::PERM).expect("snapshot");
    fs::write(local.path().join("file"), b"moved in").expect("write");
    // Into the mount: a different filesystem, so mv copies and deletes.
    exec("mv", &[&local.path().join("file"), &fx.mnt("")]).assert_success();
    exec("mv", &[&local.path().join("tree"), &fx.mnt("tree")]).assert_success();
    assert_eq!(fs::read(fx.exp("file")).expect("export"), b"moved in");
    assert!(!local.path().join("file").exists());
    assert_eq!(
        tree::snapshot(&fx.exp("tree"), Opts::PERM).expect("snapshot"),
        expected
    );
    // Within the mount: a rename.
    fs::create_dir(fx.mnt("dest")).expect("mkdir");
    exec("mv", &[&fx.mnt("file"), &fx.mnt("dest/renamed")]).assert_success();
    exec("mv", &[&fx.mnt("tree"), &fx.mnt("dest/tree")]).assert_success();
    assert_eq!(
        fs::read(fx.exp("dest/renamed")).expect("export"),
        b"moved in"
    );
    assert!(!fx.exp("file").exists() && !fx.exp("tree").exists());
    assert_eq!(
        tree::snapshot(&fx.exp("dest/tree"), Opts::PERM).expect("snapshot"),
        expected
    );
    // Out of the mount.
    exec("mv", &[&fx.mnt("dest/tree"), &local.path().join("out")]).assert_success();
    assert_eq!(
        tree::snapshot(&local.path().join("out"), Opts::PERM).expect("snapshot"),
        expected
    );
    assert!(
        !fx.exp("dest/tree").exists(),
        "mv out left the source behind"
    );
}

#[test]
fn rm_r_removes_a_tree() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        tree::make_sample(&e.join("victim"), 4).expect("sample tree");
    }) else {
        return;
    };
    fs::write(fx.mnt("keep"), b"k").expect("write");
    exec("rm", &[&"-r", &fx.mnt("victim")]).assert_success();
    assert!(!fx.exp("victim").exists(), "export still has the tree");
    assert_eq!(
        fs::read_dir(fx.exp("")).expect("readdir").count(),
        1,
        "only `keep` should be left"
    );
}

/// `rm -r` reads a directory while deleting from it: a listing whose offsets shift under
/// deletions would skip entries and leave the directory non-empty.
#[test]
fn rm_r_of_a_big_directory() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        for d in 0..3 {
            let dir = e.join(format!("big/d{d}"));
            fs::create_dir_all(&dir).expect("mkdir");
            for i in 0..700 {
                fs::write(dir.join(format!("file-{i:04}")), b"x").expect("write");
            }
        }
    }) else {
        return;
    };
    exec("rm", &[&"-r", &fx.mnt("big")]).assert_success();
    assert!(!fx.exp("big").exists(), "export still has the tree");
    // And the same for a tree made through the mount.
    fs::create_dir(fx.mnt("again")).expect("mkdir");
    for i in 0..600 {
        fs::write(fx.mnt(format!("again/{i}")), b"").expect("create");
    }
    exec("rm", &[&"-rf", &fx.mnt("again")]).assert_success();
    assert!(!fx.exp("again").exists());
}

#[test]
fn cat_and_shell_redirections() {
    let Some(fx) = fixture() else { return };
    let m = fx.mount.path().display().to_string();
    let out = run(&mut sh(&format!(
        "set -e; cd '{m}'; printf hello > x; cat x x >> y; echo ' world' >> y; cat y; \
         cat < x > z; : > x"
    )));
    out.assert_success();
    assert_eq!(out.stdout_str(), "hellohello world\n");
    assert_eq!(
        fs::read(fx.exp("y")).expect("export y"),
        b"hellohello world\n"
    );
    assert_eq!(fs::read(fx.exp("z")).expect("export z"), b"hello");
    assert_eq!(fs::read(fx.exp("x")).expect("export x"), b"");
}

#[test]
fn tar_extracts_into_and_archives_from_the_mount() {
    // POSIX (pax) archives keep nanosecond mtimes; GNU tar's default format drops them.
    let Some(fx) = fixture() else { return };
    let local = temp_dir("local");
    let src = local.path().join("src");
    tree::make_sample(&src, 5).expect("sample tree");
    let archive = local.path().join("in.tar");
    exec(
        "tar",
        &[&"--format=posix", &"-cf", &archive, &"-C", &src, &"."],
    )
    .assert_success();
    fs::create_dir(fx.mnt("x")).expect("mkdir");
    exec("tar", &[&"xpf", &archive, &"-C", &fx.mnt("x")]).assert_success();
    tree::assert_same(&src, &fx.exp("x"), PERM_MTIME);
    // An archive written into the mount, extracted outside it.
    exec(
        "tar",
        &[
            &"--format=posix",
            &"-cf",
            &fx.mnt("out.tar"),
            &"-C",
            &fx.mnt("x"),
            &".",
        ],
    )
    .assert_success();
    assert_eq!(
        fs::read(fx.exp("out.tar")).expect("export"),
        fs::read(fx.mnt("out.tar")).expect("mount")
    );
    let y = local.path().join("y");
    fs::create_dir(&y).expect("mkdir");
    exec("tar", &[&"xpf", &fx.mnt("out.tar"), &"-C", &y]).assert_success();
    tree::assert_same(&src, &y, PERM_MTIME);
    // tar's own check against the disk.
    let d = exec("tar", &[&"df", &archive, &"-C", &fx.mnt("x")]);
    d.assert_success();
}

#[test]
fn git_commit_inside_the_mount() {
    if run(Command::new("git").arg("--version")).code() != Some(0) {
        eprintln!("skipping git_commit_inside_the_mount: git is not installed");
        return;
    }
    let Some(fx) = fixture() else { return };
    let home = temp_dir("home");
    let git = |dir: &Path, args: &[&str]| {
        let mut c = Command::new("git");
        c.current_dir(dir)
            .args(args)
            .env("HOME", home.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "Ferry Test")
            .env("GIT_AUTHOR_EMAIL", "test@ferry.invalid")
            .env("GIT_COMMITTER_NAME", "Ferry Test")
            .env("GIT_COMMITTER_EMAIL", "test@ferry.invalid");
        let out = run(&mut c);
        out.assert_success();
        out.stdout_str()
    };
    let repo = fx.mnt("repo");
    fs::create_dir(&repo).expect("mkdir");
    git(&repo, &["init", "-q", "-b", "main"]);
    tree::make_sample(&repo.join("files"), 6).expect("sample tree");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    fs::write(repo.join("files/a.txt"), b"changed\n").expect("write");
    git(&repo, &["commit", "-q", "-am", "second"]);
    assert_eq!(
        git(&repo, &["status", "--porcelain"]),
        "",
        "working tree not clean"
    );
    assert_eq!(git(&repo, &["log", "--oneline"]).lines().count(), 2);
    git(&repo, &["gc", "-q"]);
    git(&repo, &["fsck", "--strict", "--no-progress"]);
    // It clones out.
    let local = temp_dir("local");
    let clone = local.path().join("clone");
    git(
        local.path(),
        &["clone", "-q", &repo.display().to_string(), "clone"],
    );
    assert_eq!(
        fs::read(clone.join("files/a.txt")).expect("cloned file"),
        b"changed\n"
    );
    assert_eq!(
        fs::read(clone.join("files/bin.dat")).expect("cloned file"),
        fs::read(fx.exp("repo/files/bin.dat")).expect("export")
    );
    // The repository as the server stored it is just as good (last: `git status` may
    // rewrite the index behind the mount's back).
    let exported = fx.exp("repo");
    git(&exported, &["fsck", "--strict", "--no-progress"]);
    assert_eq!(git(&exported, &["status", "--porcelain"]), "");
}

#[test]
fn find_lists_the_same_as_on_the_export() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        tree::make_sample(e, 7).expect("sample tree");
    }) else {
        return;
    };
    let list = |root: &Path, extra: &[&str]| {
        let out = run(Command::new("find")
            .arg(root)
            .args(extra)
            .args(["-printf", "%y %m %s %P\n"]));
        out.assert_success();
        let mut lines: Vec<String> = out
            .stdout_str()
            .lines()
            .filter(|l| !l.ends_with(' ')) // the root itself (empty %P)
            .map(|l| {
                // Directory sizes are the server filesystem's business.
                let f: Vec<&str> = l.splitn(4, ' ').collect();
                if f[0] == "d" {
                    format!("d {} - {}", f[1], f[3])
                } else {
                    l.to_string()
                }
            })
            .collect();
        lines.sort();
        lines
    };
    let on_mount = list(fx.mount.path(), &[]);
    assert_eq!(on_mount, list(fx.server.export_path(), &[]));
    assert!(on_mount.len() >= 12, "find saw too little: {on_mount:?}");
    let files = list(fx.mount.path(), &["-type", "f", "-name", "*.txt"]);
    assert_eq!(files.len(), 3, "{files:?}");
    let links = list(fx.mount.path(), &["-type", "l"]);
    assert_eq!(links.len(), 3, "{links:?}");
}

#[test]
fn du_and_df_agree_with_the_export() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        tree::make_sample(e, 8).expect("sample tree");
    }) else {
        return;
    };
    let du = |root: &Path, flag: &str| {
        let out = run(Command::new("du").args(["-s", flag]).arg(root));
        out.assert_success();
        out.stdout_str()
            .split_whitespace()
            .next()
            .expect("du prints a number")
            .parse::<u64>()
            .expect("du number")
    };
    let apparent = |root: &Path| {
        // Apparent size of files and symlinks only: directory sizes are the filesystem's.
        let out = run(Command::new("find")
            .arg(root)
            .args(["!", "-type", "d", "-printf", "%s\n"]));
        out.assert_success();
        out.stdout_str()
            .lines()
            .map(|l| l.parse::<u64>().expect("size"))
            .sum::<u64>()
    };
    assert_eq!(apparent(fx.mount.path()), apparent(fx.server.export_path()));
    assert_eq!(
        du(fx.mount.path(), "--block-size=1"),
        du(fx.server.export_path(), "--block-size=1"),
        "du (allocated blocks) differs between mount and export"
    );
    let df = run(Command::new("df").arg("-P").arg(fx.mount.path()));
    df.assert_success();
    assert!(df.stdout_str().lines().count() == 2, "{df}");
}
