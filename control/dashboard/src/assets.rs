//! The page, its script and its style, built into the binary: the dashboard needs no CDN
//! and no build step, and works on a cluster with no internet.
//!
//! One HTML shell and one script that renders each page from the cluster's API, not
//! server-rendered HTML: the pages read exactly what the CLI reads, the assets are cached by
//! the browser, and a page's data is JSON the size of the answer it shows.

pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const INDEX: Asset = Asset {
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../assets/index.html"),
};

/// The page every dashboard path but the API answers with.
pub fn index() -> &'static Asset {
    &INDEX
}

/// An asset under `/assets/`, by its file name.
pub fn get(name: &str) -> Option<&'static Asset> {
    const SCRIPT: Asset = Asset {
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/app.js"),
    };
    const STYLE: Asset = Asset {
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../assets/style.css"),
    };
    match name {
        "app.js" => Some(&SCRIPT),
        "style.css" => Some(&STYLE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t01_the_page_loads_only_assets_that_exist() {
        let page = std::str::from_utf8(index().body).unwrap();
        for name in ["app.js", "style.css"] {
            assert!(page.contains(&format!("/assets/{name}")), "{name}");
            assert!(get(name).is_some(), "{name}");
        }
        assert!(get("../Cargo.toml").is_none());
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "nothing from elsewhere"
        );
    }
}
