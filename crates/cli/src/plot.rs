//! A minimal SVG line chart for benchmark reports (no plotting dependency needed for
//! two small panels).

/// One line: a label and (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// One chart: title, axis labels and its lines.
pub struct Panel<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
}

/// Renders one panel with its top-left corner at `origin`, `size` pixels large.
fn panel(out: &mut String, origin: (f64, f64), size: (f64, f64), chart: &Panel) {
    let ((ox, oy), (w, h)) = (origin, size);
    let Panel {
        title,
        x_label,
        y_label,
        series,
    } = *chart;
    let (l, r, t, b) = (60.0, 20.0, 30.0, 45.0);
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .collect();
    let (xmin, xmax) = (
        xs.iter().cloned().fold(f64::INFINITY, f64::min),
        xs.iter().cloned().fold(0.0, f64::max),
    );
    let ymax = ys.iter().cloned().fold(0.0, f64::max).max(1.0) * 1.1;
    let px = |x: f64| ox + l + (x - xmin) / (xmax - xmin).max(1e-9) * (w - l - r);
    let py = |y: f64| oy + h - b - y / ymax * (h - t - b);
    out.push_str(&format!(
        "<text x='{:.0}' y='{:.0}' font-size='14' text-anchor='middle'>{title}</text>\n",
        ox + w / 2.0,
        oy + 18.0
    ));
    out.push_str(&format!(
        "<line x1='{0:.0}' y1='{1:.0}' x2='{2:.0}' y2='{1:.0}' stroke='black'/><line x1='{0:.0}' y1='{1:.0}' x2='{0:.0}' y2='{3:.0}' stroke='black'/>\n",
        ox + l, oy + h - b, ox + w - r, oy + t
    ));
    for i in 0..=4 {
        let y = ymax * f64::from(i) / 4.0;
        out.push_str(&format!(
            "<text x='{:.0}' y='{:.0}' font-size='10' text-anchor='end'>{y:.0}</text>\n",
            ox + l - 5.0,
            py(y) + 3.0
        ));
    }
    let mut ticks: Vec<f64> = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for x in ticks {
        out.push_str(&format!(
            "<text x='{:.0}' y='{:.0}' font-size='10' text-anchor='middle'>{x:.0}</text>\n",
            px(x),
            oy + h - b + 14.0
        ));
    }
    out.push_str(&format!(
        "<text x='{:.0}' y='{:.0}' font-size='11' text-anchor='middle'>{x_label}</text>\n",
        ox + w / 2.0,
        oy + h - 8.0
    ));
    out.push_str(&format!(
        "<text x='{:.0}' y='{:.0}' font-size='11' text-anchor='middle' transform='rotate(-90 {:.0} {:.0})'>{y_label}</text>\n",
        ox + 14.0,
        oy + h / 2.0,
        ox + 14.0,
        oy + h / 2.0
    ));
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    for (i, (label, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        out.push_str(&format!(
            "<polyline fill='none' stroke='{c}' stroke-width='2' points='{}'/>\n",
            path.join(" ")
        ));
        for &(x, y) in pts {
            out.push_str(&format!(
                "<circle cx='{:.1}' cy='{:.1}' r='3' fill='{c}'/>\n",
                px(x),
                py(y)
            ));
        }
        out.push_str(&format!(
            "<text x='{:.0}' y='{:.0}' font-size='11' fill='{c}'>{label}</text>\n",
            ox + l + 8.0,
            oy + t + 14.0 * (i as f64 + 1.0)
        ));
    }
}

/// Two panels side by side.
pub fn two_panels(left: &Panel, right: &Panel) -> String {
    let (w, h) = (420.0, 300.0);
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{h}' font-family='sans-serif'>\n<rect width='100%' height='100%' fill='white'/>\n",
        2.0 * w
    );
    panel(&mut out, (0.0, 0.0), (w, h), left);
    panel(&mut out, (w, 0.0), (w, h), right);
    out.push_str("</svg>\n");
    out
}
